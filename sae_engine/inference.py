"""SAEs at inference time: encode every hooked layer at once, and steer the model through them.

`SAEBundle` stacks the SAEs of one set (same width and k, one per hooked layer) so that one
batched matmul encodes all layers of a forward pass; `LayerTap` reads (and optionally edits) the
hooked activations of each forward pass during token-by-token generation; `steering_edits` turns
interventions on features into error-preserving edits of the hooked activations:

    h' = h + sum_f (a'_f - a_f) W_dec[f]

so whatever the SAE fails to reconstruct stays in `h`. Per mode, with a_f the feature's current
activation and n_f its normaliser (raw activation of normalised 1.0):

    clamp  a'_f = value * n_f           scale  a'_f = value * a_f
    ablate a'_f = 0                     add    h' = h + value * n_f * W_dec[f]   (Neuronpedia-style)

Two more modes act on a layer's refusal direction r (Arditi et al.) instead of a feature:

    direction_ablate  h' = h - (h . r^) r^      direction_add  h' = h + value * r

An intervention may be conditional (`when`): it acts only at the positions where a feature's normalised
activation, read at the same or an earlier hooked layer before any edit there, exceeds a threshold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_engine.hooks import (
    HookPoint,
    _primary,
    _replace_primary,
    as_hook_points,
    hook_module,
)
from sae_engine.topk import TopKOutput, TopKSAE

Mode = Literal["clamp", "scale", "ablate", "add", "direction_ablate", "direction_add"]
Scope = Literal["prompt", "response", "both"]
FEATURE_MODES: tuple[str, ...] = ("clamp", "scale", "ablate", "add")
DIRECTION_MODES: tuple[str, ...] = ("direction_ablate", "direction_add")
MODES: tuple[str, ...] = FEATURE_MODES + DIRECTION_MODES
SCOPES: tuple[str, ...] = ("prompt", "response", "both")
EditFn = Callable[[Tensor], Tensor]


class SteeringError(ValueError):
    """An intervention names a feature the bundle cannot steer; the message names it."""


@dataclass
class SAEBundle:
    """The SAEs of all hooked layers of one set, stacked layer-major.

    `normalisers[slot, index]` is the raw activation of normalised 1.0; +inf where unknown, which
    makes the normalised activation 0 (such a feature never tints a token).
    """

    hook_points: tuple[HookPoint, ...]
    # Encoder rows feature-major, the layout of a linear layer's weight: one token's encode is a
    # GEMV through the same BLAS kernels as the model's own layers, reading each encoder once.
    W_enc_rows: Tensor  # (L, d_sae, d_in) = W_enc transposed
    b_enc: Tensor  # (L, 1, d_sae)
    W_dec: Tensor  # (L, d_sae, d_in)
    b_dec: Tensor  # (L, 1, d_in)
    k: int
    normalisers: Tensor  # (L, d_sae) float32
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self._slot = {p.layer: i for i, p in enumerate(self.hook_points)}
        # The overlay encode may run in a lower precision (bf16 halves the bytes read per token);
        # steering edits always use the float32 weights.
        self._rows = self.W_enc_rows.to(self.compute_dtype)
        self._b_enc_compute = self.b_enc[:, 0].to(self.compute_dtype)
        self._b_dec_compute = self.b_dec.to(self.compute_dtype)

    @classmethod
    def from_saes(
        cls,
        saes: Mapping[str | HookPoint, TopKSAE],
        normalisers: Mapping[str | HookPoint, Tensor] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> SAEBundle:
        if not saes:
            raise ValueError("an SAE bundle needs at least one SAE")
        points = as_hook_points(saes.keys())
        by_point = dict(zip(points, saes.values()))
        ordered = sorted(by_point, key=lambda p: p.execution_order)
        if len({p.layer for p in ordered}) != len(ordered):
            raise ValueError(f"one SAE per layer: got {[p.name for p in ordered]}")
        first = by_point[ordered[0]]
        for point in ordered:
            sae = by_point[point]
            if (sae.d_in, sae.d_sae, sae.k) != (first.d_in, first.d_sae, first.k):
                raise ValueError(
                    f"{point.name}: SAE shape (d_in={sae.d_in}, d_sae={sae.d_sae}, k={sae.k}) differs from "
                    f"{ordered[0].name} (d_in={first.d_in}, d_sae={first.d_sae}, k={first.k}); a bundle holds one set"
                )
        device = torch.device(device) if device is not None else first.W_enc.device
        norms = torch.full((len(ordered), first.d_sae), float("inf"))
        by_name = {HookPoint.parse(str(key)) if not isinstance(key, HookPoint) else key: value
                   for key, value in (normalisers or {}).items()}
        for slot, point in enumerate(ordered):
            if point in by_name:
                values = torch.as_tensor(by_name[point], dtype=torch.float32).flatten()
                if values.numel() != first.d_sae:
                    raise ValueError(f"{point.name}: {values.numel()} normalisers for an SAE of width {first.d_sae}")
                values = torch.where(torch.isfinite(values) & (values > 0), values, torch.full_like(values, float("inf")))
                norms[slot] = values

        def stack(name: str) -> Tensor:
            return torch.stack([getattr(by_point[p], name).detach().float() for p in ordered]).to(device)

        return cls(
            hook_points=tuple(ordered),
            W_enc_rows=torch.stack([by_point[p].W_enc.detach().float().t() for p in ordered]).to(device).contiguous(),
            b_enc=stack("b_enc").unsqueeze(1),
            W_dec=stack("W_dec"),
            b_dec=stack("b_dec").unsqueeze(1),
            k=first.k,
            normalisers=norms.to(device),
            compute_dtype=compute_dtype,
        )

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(p.layer for p in self.hook_points)

    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.hook_points)

    @property
    def d_sae(self) -> int:
        return self.W_enc_rows.shape[1]

    @property
    def d_in(self) -> int:
        return self.W_enc_rows.shape[2]

    @property
    def device(self) -> torch.device:
        return self.W_enc_rows.device

    def slot(self, layer: int) -> int:
        try:
            return self._slot[layer]
        except KeyError:
            raise SteeringError(f"layer {layer} is not hooked; hooked layers: {list(self.layers)}") from None

    @torch.inference_mode()
    def encode(self, acts: Tensor) -> TopKOutput:
        """TopK latents of every layer at once: acts (L, T, d_in) -> values, indices (L, T, k)."""
        x = acts.to(device=self.device, dtype=self.compute_dtype) - self._b_dec_compute
        pre = torch.stack([F.linear(x[slot], self._rows[slot], self._b_enc_compute[slot]) for slot in range(len(x))])
        top = pre.topk(self.k, dim=-1, sorted=False)
        return TopKOutput(top.values.float().relu_(), top.indices)

    def normalise(self, top: TopKOutput) -> Tensor:
        """Normalised activations (L, T, k) of `encode`'s output."""
        n_layers, n_tokens, k = top.indices.shape
        norms = self.normalisers.gather(1, top.indices.reshape(n_layers, n_tokens * k)).reshape(n_layers, n_tokens, k)
        return top.values / norms

    def encode_layer(self, slot: int, h: Tensor) -> TopKOutput:
        """Float32 TopK latents of one layer (..., d_in) -> (..., k): what steering edits read."""
        pre = F.linear(h.float() - self.b_dec[slot, 0], self.W_enc_rows[slot], self.b_enc[slot, 0])
        top = pre.topk(self.k, dim=-1, sorted=False)
        return TopKOutput(top.values.relu(), top.indices)

    def feature_activations(self, top: TopKOutput, indices: Tensor) -> Tensor:
        """Activations (..., n) of the features `indices` (n,) from TopK output (..., k); 0 when not selected."""
        hit = top.indices.unsqueeze(-1) == indices.to(top.indices.device)
        return (top.values.unsqueeze(-1) * hit).sum(-2)


class LayerTap:
    """Reads the hooked activations of each forward pass (after any edit), for one thread only.

    Hooks are global to a module, and another thread may run the same model (e.g. the
    OpenAI-compatible endpoint): a tap ignores forward passes of every other thread.
    """

    def __init__(self, model: nn.Module, bundle: SAEBundle, edits: Mapping[str, EditFn] | None = None) -> None:
        self.model = model
        self.bundle = bundle
        self.edits = dict(edits or {})
        unknown = set(self.edits) - set(bundle.hook_names)
        if unknown:
            raise SteeringError(f"edits at hook points the bundle does not hold: {sorted(unknown)}")
        self._latest: list[Tensor | None] = [None] * len(bundle.hook_points)
        self._handles: list = []
        self._thread = threading.get_ident()

    def _hook(self, slot: int, fn: EditFn | None) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor | tuple):
            if threading.get_ident() != self._thread:
                return None
            h = _primary(output)
            if fn is not None:
                h = fn(h)
                self._latest[slot] = h.detach()
                return _replace_primary(output, h)
            self._latest[slot] = h.detach()
            return None

        return hook

    def __enter__(self) -> LayerTap:  # noqa: PYI034
        self._thread = threading.get_ident()
        for slot, point in enumerate(self.bundle.hook_points):
            module = hook_module(self.model, point)
            self._handles.append(module.register_forward_hook(self._hook(slot, self.edits.get(point.name))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self, batch_index: int = 0) -> Tensor:
        """(L, T, d_in) activations of the last forward pass."""
        if any(t is None for t in self._latest):
            raise RuntimeError("no forward pass ran through every hooked layer inside the tap")
        return torch.stack([t[batch_index] for t in self._latest])  # type: ignore[index]


@dataclass
class PositionClock:
    """Where the current forward pass sits in the sequence, so edits know prompt from response.

    The generation loop sets `offset` (absolute position of the pass's first token) before each pass.
    """

    prompt_len: int = 0
    offset: int = 0

    def in_prompt(self, n_tokens: int, device: torch.device) -> Tensor:
        return torch.arange(self.offset, self.offset + n_tokens, device=device) < self.prompt_len


@dataclass(frozen=True)
class Condition:
    """Act only where feature (layer, index) has a normalised activation above `above`."""

    layer: int
    index: int
    above: float

    @property
    def feature_id(self) -> str:
        return f"{self.layer}_{self.index}"


@dataclass(frozen=True)
class Intervention:
    layer: int
    index: int  # the feature; unused (-1) by the direction modes
    mode: Mode
    value: float = 0.0
    scope: Scope = "both"
    when: Condition | None = None

    @property
    def feature_id(self) -> str:
        return f"{self.layer}_direction" if self.mode in DIRECTION_MODES else f"{self.layer}_{self.index}"


class _Conditions:
    """The `when` masks of one forward pass: each condition is read at its own layer, before that layer's edits."""

    def __init__(self, bundle: SAEBundle, conditions: Sequence[Condition]) -> None:
        self.bundle = bundle
        self.by_slot: dict[int, list[Condition]] = {}
        for c in conditions:
            slot = bundle.slot(c.layer)
            if not 0 <= c.index < bundle.d_sae:
                raise SteeringError(f"when.feature {c.feature_id}: index out of range 0..{bundle.d_sae - 1}")
            if not torch.isfinite(bundle.normalisers[slot, c.index]):
                raise SteeringError(f"when.feature {c.feature_id}: has no normaliser, so a threshold in normalised units is undefined")
            self.by_slot.setdefault(slot, []).append(c)
        self.masks: dict[Condition, Tensor] = {}

    def observe(self, slot: int, h: Tensor) -> None:
        items = self.by_slot.get(slot)
        if not items:
            return
        indices = torch.tensor([c.index for c in items], device=h.device)
        normalised = self.bundle.feature_activations(self.bundle.encode_layer(slot, h), indices) / self.bundle.normalisers[slot, indices]
        for j, c in enumerate(items):
            self.masks[c] = normalised[..., j] > c.above

    def mask(self, condition: Condition | None, like: Tensor) -> Tensor:
        """(..., T) 1.0 where `condition` holds (everywhere without one)."""
        if condition is None:
            return torch.ones(like.shape[:-1], device=like.device)
        return self.masks[condition].float()


def steering_edits(
    bundle: SAEBundle,
    interventions: Sequence[Intervention],
    clock: PositionClock,
    directions: Mapping[int, Tensor] | None = None,
) -> dict[str, EditFn]:
    """Edit functions per hook point; each intervention acts once, at its own layer.

    All feature modes are one affine rule on the feature's activation, a'_f = alpha * a_f + beta
    (clamp: 0, v n_f; scale: v, 0; ablate: 0, 0; add: 1, v n_f), applied along the decoder directions:
    h += sum_f c_f W_dec[f]. For add, c_f = v n_f. For clamp, scale and ablate, c solves G c = a' - a with
    G_ij = W_enc[i] . W_dec[j]: in a trained SAE a decoder direction does not move its own pre-activation
    by exactly 1, so this is what makes the edited activation, encoded again, equal a'_f. The direction
    modes use `directions[layer]`, the layer's refusal direction (not normalised).
    """
    seen: set[str] = set()
    by_slot: dict[int, list[Intervention]] = {}
    for item in interventions:
        if item.mode not in MODES:
            raise SteeringError(f"{item.feature_id}: unknown mode {item.mode!r}; use one of {MODES}")
        if item.scope not in SCOPES:
            raise SteeringError(f"{item.feature_id}: unknown scope {item.scope!r}; use one of {SCOPES}")
        if item.feature_id in seen:
            raise SteeringError(f"{item.feature_id}: more than one intervention on the same feature")
        seen.add(item.feature_id)
        slot = bundle.slot(item.layer)
        if item.when is not None and item.when.layer > item.layer:
            raise SteeringError(f"{item.feature_id}: when.feature {item.when.feature_id} is read after layer {item.layer}; "
                                "a condition must come from the same or an earlier hooked layer")
        if item.mode in DIRECTION_MODES:
            if directions is None or item.layer not in directions:
                have = sorted(directions or {})
                raise SteeringError(f"{item.feature_id}: layer {item.layer} has no refusal direction (layers with one: {have})")
        else:
            if not 0 <= item.index < bundle.d_sae:
                raise SteeringError(f"{item.feature_id}: index out of range 0..{bundle.d_sae - 1}")
            if item.mode in ("clamp", "add") and not torch.isfinite(bundle.normalisers[slot, item.index]):
                raise SteeringError(f"{item.feature_id}: has no normaliser, so {item.mode} (in normalised units) is undefined")
        by_slot.setdefault(slot, []).append(item)
    conditions = _Conditions(bundle, [i.when for i in interventions if i.when is not None])
    slots = sorted(set(by_slot) | set(conditions.by_slot))
    edits = {}
    for slot in slots:
        items = by_slot.get(slot, [])
        features = [i for i in items if i.mode in FEATURE_MODES]
        steered = [i for i in items if i.mode in DIRECTION_MODES]
        parts = []
        if features:
            parts.append(_layer_edit(bundle, slot, features, clock, conditions))
        parts += [_direction_edit(directions[i.layer].to(bundle.device), i, clock, conditions) for i in steered]
        edits[bundle.hook_points[slot].name] = _observed(slot, conditions, parts)
    return edits


def _observed(slot: int, conditions: _Conditions, parts: list[EditFn]) -> EditFn:
    def edit(h: Tensor) -> Tensor:
        conditions.observe(slot, h)
        for part in parts:
            h = part(h)
        return h

    return edit


def _scope_mask(item: Intervention, clock: PositionClock, h: Tensor) -> Tensor:
    """(T,) 1.0 at the positions the intervention's scope covers."""
    in_prompt = clock.in_prompt(h.shape[-2], h.device)
    wanted_prompt, wanted_response = item.scope in ("prompt", "both"), item.scope in ("response", "both")
    return torch.where(in_prompt, torch.tensor(float(wanted_prompt), device=h.device), torch.tensor(float(wanted_response), device=h.device))


def _direction_edit(direction: Tensor, item: Intervention, clock: PositionClock, conditions: _Conditions) -> EditFn:
    unit = direction.float() / direction.float().norm()

    def edit(h: Tensor) -> Tensor:
        active = (_scope_mask(item, clock, h) * conditions.mask(item.when, h)).unsqueeze(-1)  # (..., T, 1)
        if item.mode == "direction_ablate":
            change = -(h.float() @ unit).unsqueeze(-1) * unit
        else:
            change = item.value * direction.float().expand_as(h)
        return h + (active * change).to(h.dtype)

    return edit


def _layer_edit(bundle: SAEBundle, slot: int, items: list[Intervention], clock: PositionClock, conditions: _Conditions) -> EditFn:
    device = bundle.device
    indices = torch.tensor([i.index for i in items], device=device)
    values = torch.tensor([i.value for i in items], dtype=torch.float32, device=device)
    norms = bundle.normalisers[slot, indices]
    modes = [i.mode for i in items]
    is_scale = torch.tensor([m == "scale" for m in modes], device=device)
    is_add = torch.tensor([m == "add" for m in modes], device=device)
    is_clamp = torch.tensor([m == "clamp" for m in modes], device=device)
    alpha = torch.where(is_scale, values, is_add.float())
    beta = torch.where(is_clamp | is_add, values * norms, torch.zeros_like(values))
    needs_encode = any(m != "add" for m in modes)
    directions = bundle.W_dec[slot, indices]  # (n, d_in)
    response = _edit_response(bundle, slot, items, indices, directions, ~is_add)

    def edit(h: Tensor) -> Tensor:
        active = torch.stack([_scope_mask(i, clock, h) * conditions.mask(i.when, h) for i in items], dim=-1)  # (..., T, n)
        if needs_encode:
            current = bundle.feature_activations(bundle.encode_layer(slot, h), indices)  # (..., T, n)
        else:
            current = torch.zeros(*h.shape[:-1], len(items), device=h.device)
        coeff = (((alpha - 1.0) * current + beta) * active) @ response
        return h + (coeff @ directions).to(h.dtype)

    return edit


# Below this, a unit move along the decoder directions moves the features' activations by less than 1/20:
# the edit would have to be over 20 times the asked change, far off the SAE's data.
MIN_EDIT_RESPONSE = 0.05


def _edit_response(bundle: SAEBundle, slot: int, items: list[Intervention], indices: Tensor, directions: Tensor,
                   targeted: Tensor) -> Tensor:
    """(n, n) map from the asked activation changes to decoder-direction coefficients (row vectors)."""
    encoders = bundle.W_enc_rows[slot, indices].float()
    gram = encoders @ directions.float().t()  # gram[i, j]: how far edit j moves feature i's pre-activation
    both = targeted[:, None] & targeted[None, :]
    eye = torch.eye(len(items), device=gram.device)
    system = torch.where(both, gram, eye)
    if float(torch.linalg.svdvals(system).min()) < MIN_EDIT_RESPONSE:
        names = ", ".join(i.feature_id for i, t in zip(items, targeted.tolist()) if t)
        raise SteeringError(f"{names}: their decoder directions barely move their own activations (encoder and "
                            "decoder nearly orthogonal), so clamp, scale and ablate cannot set them; use add")
    return torch.linalg.inv(system).t()
