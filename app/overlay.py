"""The per-token overlay: each token's strongest features across all hooked layers.

A feature counts when it is explained or safety-tagged and has a normaliser; its normalised
activation is raw / normaliser. Everything per token is tensor work over (layers x k) latents,
so a generated token costs one batched encode and one top-n, never a loop over features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.queries import FeatureMeta
from sae_engine.inference import SAEBundle
from sae_engine.topk import TopKOutput

# Normalised activations below this are noise for display purposes (a chip would be invisible).
MIN_SHOWN = 0.01


@dataclass
class TokenFeatures:
    """One token's overlay: the tint (strongest counted activation) and the top features."""

    tint: float
    top: list[tuple[str, float]]

    def payload(self) -> dict:
        return {"tint": round(self.tint, 4), "top": [[fid, round(value, 4)] for fid, value in self.top]}


class FeatureMasks:
    """Which (layer slot, index) pairs count toward the overlay: all, safety-tagged, per domain."""

    def __init__(self, layers: tuple[int, ...], d_sae: int, catalog: dict[str, FeatureMeta]) -> None:
        self.layers = layers
        slot = {layer: i for i, layer in enumerate(layers)}
        self.counted = torch.zeros(len(layers), d_sae, dtype=torch.bool)
        self.safety = torch.zeros(len(layers), d_sae, dtype=torch.bool)
        self.by_domain: dict[str, Tensor] = {}
        for meta in catalog.values():
            if meta.layer not in slot or not 0 <= meta.index < d_sae:
                continue
            position = (slot[meta.layer], meta.index)
            if (meta.explained or meta.is_safety) and meta.normaliser:
                self.counted[position] = True
                self.safety[position] = meta.is_safety
                for domain in meta.domains:
                    mask = self.by_domain.setdefault(domain, torch.zeros(len(layers), d_sae, dtype=torch.bool))
                    mask[position] = True

    def restricted(self, domains: Iterable[str] | None) -> Tensor:
        """The counted mask, limited to features tagged with one of `domains` (None: no limit)."""
        if domains is None:
            return self.counted
        mask = torch.zeros_like(self.counted)
        for domain in domains:
            if domain in self.by_domain:
                mask |= self.by_domain[domain]
        return mask


class Overlay:
    """Turns hooked activations (L, T, d_in) into per-token `TokenFeatures`."""

    def __init__(self, bundle: SAEBundle, mask: Tensor, top_n: int = 12) -> None:
        self.bundle = bundle
        self.mask = mask.to(bundle.device)
        self.top_n = top_n
        self.layers = bundle.layers

    def scores(self, top: TopKOutput) -> Tensor:
        """Normalised activations (L, T, k) with non-counted features zeroed."""
        n_layers, n_tokens, k = top.indices.shape
        counted = self.mask.gather(1, top.indices.reshape(n_layers, n_tokens * k)).reshape(n_layers, n_tokens, k)
        return self.bundle.normalise(top) * counted

    def tokens(self, acts: Tensor) -> list[TokenFeatures]:
        top = self.bundle.encode(acts)
        scores = self.scores(top)
        n_layers, n_tokens, k = scores.shape
        per_token = scores.permute(1, 0, 2).reshape(n_tokens, n_layers * k)
        n = min(self.top_n, n_layers * k)
        values, flat = per_token.topk(n, dim=-1)
        slots = flat // k
        features = top.indices.permute(1, 0, 2).reshape(n_tokens, n_layers * k).gather(1, flat)
        tints = values[:, 0].tolist()
        rows = zip(values.tolist(), slots.tolist(), features.tolist())
        layers = self.layers
        return [
            TokenFeatures(
                tint=tint,
                top=[(f"{layers[s]}_{f}", v) for v, s, f in zip(vs, ss, fs) if v >= MIN_SHOWN],
            )
            for tint, (vs, ss, fs) in zip(tints, rows)
        ]

    def tracked(self, acts: Tensor, features: list[tuple[int, int]]) -> Tensor:
        """Activations (T, n) of chosen (layer, index) features, counted or not: normalised where the
        feature has a normaliser, raw otherwise (see `has_normaliser`)."""
        top = self.bundle.encode(acts)
        columns = []
        for layer, index in features:
            slot = self.bundle.slot(layer)
            raw = (top.values[slot] * (top.indices[slot] == index)).sum(-1)
            normaliser = self.bundle.normalisers[slot, index]
            columns.append(raw / normaliser if torch.isfinite(normaliser) else raw)
        return torch.stack(columns, dim=-1) if columns else torch.zeros(acts.shape[1], 0)

    def has_normaliser(self, layer: int, index: int) -> bool:
        return bool(torch.isfinite(self.bundle.normalisers[self.bundle.slot(layer), index]))

    def layer_maxima(self, acts: Tensor) -> Tensor:
        """Per layer, each feature's maximum normalised activation over the tokens: (L, d_sae)."""
        top = self.bundle.encode(acts)
        scores = self.scores(top)
        n_layers = scores.shape[0]
        out = torch.zeros(n_layers, self.bundle.d_sae, device=scores.device)
        return out.scatter_reduce(1, top.indices.reshape(n_layers, -1), scores.reshape(n_layers, -1), reduce="amax")

    def grid(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """(L, T) strongest counted activation per layer and token, and the index of that feature."""
        top = self.bundle.encode(acts)
        scores = self.scores(top)
        best, where = scores.max(dim=-1)
        return best, top.indices.gather(-1, where.unsqueeze(-1)).squeeze(-1)


def domain_summary(tokens: Iterable[TokenFeatures], catalog: dict[str, FeatureMeta]) -> dict[str, float]:
    """Strongest normalised activation per domain over some tokens, strongest domain first."""
    best: dict[str, float] = {}
    for token in tokens:
        for fid, value in token.top:
            meta = catalog.get(fid)
            if meta is None:
                continue
            for domain in meta.domains:
                if value > best.get(domain, 0.0):
                    best[domain] = value
    return dict(sorted(((d, round(v, 4)) for d, v in best.items()), key=lambda item: -item[1]))
