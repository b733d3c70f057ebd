"""Hook points named like TransformerLens (`blocks.{L}.hook_mlp_out`) on HF decoder-only models.

`capture` collects several hook points in one forward pass and, by default, stops the pass
right after the deepest one (no later layers, no logits). `edit` replaces a hooked activation
with a function of it; steering and the spliced-reconstruction loss both go through it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

KINDS = ("attn_out", "mlp_out", "resid_post")
_NAME = re.compile(r"^blocks\.(\d+)\.hook_(attn_out|mlp_out|resid_post)$")


class HookPointError(ValueError):
    """A hook point name is malformed or does not exist in the model."""


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    kind: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        match = _NAME.match(name)
        if not match:
            raise HookPointError(
                f"bad hook point {name!r}: expected blocks.<layer>.hook_<{'|'.join(KINDS)}>"
            )
        return cls(int(match.group(1)), match.group(2))

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def execution_order(self) -> tuple[int, int]:
        return (self.layer, KINDS.index(self.kind))

    def __str__(self) -> str:
        return self.name


def as_hook_points(names: Iterable[str | HookPoint]) -> list[HookPoint]:
    return [n if isinstance(n, HookPoint) else HookPoint.parse(n) for n in names]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a Llama/Qwen2/Mistral/Gemma-style model."""
    n_layers = model.config.num_hidden_layers
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "layers"):
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise HookPointError(f"cannot find the decoder layers of {type(model).__name__}")


def hook_module(model: nn.Module, point: HookPoint) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= point.layer < len(layers):
        raise HookPointError(f"{point.name}: the model has layers 0..{len(layers) - 1}")
    block = layers[point.layer]
    if point.kind == "resid_post":
        return block
    # Gemma-2/3 normalise the sublayer outputs before adding them to the residual stream; the
    # normalised output is what the residual stream receives, so that is the hook point.
    sandwich = hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")
    if point.kind == "mlp_out":
        return block.post_feedforward_layernorm if sandwich else block.mlp
    return block.post_attention_layernorm if sandwich else block.self_attn


def _primary(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_primary(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    return (new, *output[1:]) if isinstance(output, tuple) else new


class _StopForward(Exception):
    pass


@contextmanager
def capture(
    model: nn.Module, points: Iterable[str | HookPoint], stop_early: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the activations of `points` during forward passes run inside the block.

    With `stop_early`, the forward pass is cut after the deepest point: run it with `run_to_capture`.
    Without it, each pass appends its activations (for generation, one tensor per step).
    """
    hook_points = sorted(set(as_hook_points(points)), key=lambda p: p.execution_order)
    deepest = hook_points[-1]
    store: dict[str, torch.Tensor] = {}
    steps: dict[str, list[torch.Tensor]] = {p.name: [] for p in hook_points}
    handles = []

    def make_hook(point: HookPoint) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            tensor = _primary(output).detach()
            if stop_early:
                store[point.name] = tensor
                if point == deepest:
                    raise _StopForward
            else:
                steps[point.name].append(tensor)
                store[point.name] = torch.cat(steps[point.name], dim=1)

        return hook

    for point in hook_points:
        handles.append(hook_module(model, point).register_forward_hook(make_hook(point)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_to_capture(model: nn.Module, **inputs) -> None:
    """Run a forward pass that a stop-early `capture` cuts short (without a key-value cache unless given one)."""
    inputs.setdefault("use_cache", False)
    try:
        with torch.inference_mode():
            model(**inputs)
    except _StopForward:
        return
    raise HookPointError("the forward pass finished without reaching the deepest hook point")


def capture_activations(
    model: nn.Module, points: Iterable[str | HookPoint], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Activations at `points` for one batch, from a forward pass that stops after the deepest one."""
    with capture(model, points) as store:
        run_to_capture(model, input_ids=input_ids, attention_mask=attention_mask)
    return dict(store)


def prefix_cache(
    model: nn.Module, points: Iterable[str | HookPoint], prefix: torch.Tensor
) -> tuple[DynamicCache, dict[str, torch.Tensor]]:
    """The key-value cache and the activations at `points` of a prefix (1, P) shared by many sequences.

    The pass stops after the deepest point, so the cache holds the layers up to it: all that a later
    stop-early pass over the continuations needs.
    """
    cache = DynamicCache(config=model.config)
    with capture(model, points) as store:
        run_to_capture(model, input_ids=prefix, past_key_values=cache, use_cache=True)
    return cache, dict(store)


def capture_after_prefix(
    model: nn.Module,
    points: Iterable[str | HookPoint],
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Activations at `points` of continuations (B, T) of the prefix held in `cache` (left untouched)."""
    batch, width = input_ids.shape
    length = cache.get_seq_length()
    extended = copy.deepcopy(cache)
    extended.batch_repeat_interleave(batch)
    full_mask = torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1)
    positions = torch.arange(length, length + width, device=input_ids.device).expand(batch, -1)
    with capture(model, points) as store:
        run_to_capture(
            model, input_ids=input_ids, attention_mask=full_mask, position_ids=positions, past_key_values=extended, use_cache=True
        )
    return dict(store)


EditFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edit(model: nn.Module, edits: Mapping[str | HookPoint, EditFn]) -> Iterator[None]:
    """Replace each hooked activation `h` by `fn(h)` for forward passes run inside the block."""
    handles = []

    def make_hook(fn: EditFn) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            return _replace_primary(output, fn(_primary(output)))

        return hook

    for point, fn in edits.items():
        hp = point if isinstance(point, HookPoint) else HookPoint.parse(point)
        handles.append(hook_module(model, hp).register_forward_hook(make_hook(fn)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
