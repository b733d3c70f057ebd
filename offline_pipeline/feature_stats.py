"""Per-feature statistics over the statistics corpus, streamed with bounded memory.

Pass 1 (`ActivationStats`) reads every token's TopK code once and keeps, per feature: the token
count it fired on, its max and min positive activation, and a fixed log-spaced histogram of its
positive activations (`n_bins` bins from `log_min` to `log_max`; positives below `log_min` go to
the first bin). Quantiles come from that histogram by geometric interpolation inside a bin, so
memory is O(d_sae * n_bins) whatever the corpus size; the relative error of a quantile is below
one bin width (10^((log10 max - log10 min) / n_bins) - 1, ~4% by default).

The normaliser (the unit of "normalised activation") is the feature's 0.999 quantile over all
tokens. Written over the feature's positive activations it is the quantile at
p' = 1 - (1 - 0.999) / density; for a feature that fires on fewer than 0.2% of tokens p' would
fall below 0.5 (or below 0, where the all-token quantile is 0), so p' is clamped to >= 0.5: such
a feature's unit is its median firing strength. That keeps the normaliser continuous in density,
and finite and positive for every live feature.

Pass 2 (`LevelReservoir`) stratifies the corpus records (a record = one document/query) over 10
activation levels by linear interpolation of the feature's max (level = floor(10 * a / max),
capped at 9, as the paper), and keeps a uniform random sample of `per_level` records per
(feature, level): each candidate gets a pseudo-random key hashed from (record, feature), and the
smallest keys are kept. The sample does not depend on the order or batching of the stream.

Output tokens: the logit-lens view of each decoder direction, W_dec @ (diag(g) W_U)^T, with g the
final norm's weight folded into the unembedding (as TransformerLens folds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_LEVELS = 10
QUANTILE_POINTS = (0.5, 0.9, 0.99, 0.999, 0.9999)


@dataclass(frozen=True)
class HistogramSpec:
    log_min: float = -4.0
    log_max: float = 5.0
    n_bins: int = 512

    @property
    def edges(self) -> np.ndarray:
        return np.logspace(self.log_min, self.log_max, self.n_bins + 1)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        width = (self.log_max - self.log_min) / self.n_bins
        position = (np.log10(np.maximum(values, 1e-30)) - self.log_min) / width
        return np.clip(position.astype(np.int64), 0, self.n_bins - 1)


class ActivationStats:
    """Streaming counts, extremes and log-histograms of every feature's positive activations."""

    def __init__(self, d_sae: int, spec: HistogramSpec = HistogramSpec()):
        self.d_sae = d_sae
        self.spec = spec
        self.n_tokens = 0
        self.fires = np.zeros(d_sae, dtype=np.int64)
        self.max = np.zeros(d_sae, dtype=np.float64)
        self.min_positive = np.full(d_sae, np.inf)
        self.total = np.zeros(d_sae, dtype=np.float64)
        self.counts = np.zeros((d_sae, spec.n_bins), dtype=np.int64)

    def add(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Add the codes of `len(indices)` tokens: `indices`, `values` of shape (tokens, k)."""
        indices, values = np.asarray(indices), np.asarray(values, dtype=np.float64)
        if indices.shape != values.shape:
            raise ValueError(f"indices {indices.shape} and values {values.shape} must have one shape")
        self.n_tokens += indices.shape[0]
        positive = values > 0
        idx, val = indices[positive].astype(np.int64), values[positive]
        if idx.size == 0:
            return
        if idx.max() >= self.d_sae or idx.min() < 0:
            raise ValueError(f"feature index out of range 0..{self.d_sae - 1}")
        self.fires += np.bincount(idx, minlength=self.d_sae)
        self.total += np.bincount(idx, weights=val, minlength=self.d_sae)
        # torch's scatter-reduce is much faster than numpy's ufunc.at for tens of millions of entries.
        idx_t, val_t = torch.from_numpy(idx), torch.from_numpy(val)
        torch.from_numpy(self.max).scatter_reduce_(0, idx_t, val_t, "amax")
        torch.from_numpy(self.min_positive).scatter_reduce_(0, idx_t, val_t, "amin")
        flat = idx * self.spec.n_bins + self.spec.bin_of(val)
        self.counts += np.bincount(flat, minlength=self.d_sae * self.spec.n_bins).reshape(self.d_sae, -1)

    @property
    def density(self) -> np.ndarray:
        return self.fires / max(self.n_tokens, 1)

    @property
    def live(self) -> np.ndarray:
        return self.fires > 0

    def positive_quantile(self, p: np.ndarray | float) -> np.ndarray:
        """Per-feature quantile p of the positive activations (NaN for dead features)."""
        p = np.broadcast_to(np.asarray(p, dtype=np.float64), (self.d_sae,))
        edges = np.log10(self.spec.edges)
        cumulative = np.cumsum(self.counts, axis=1)
        rank = p * self.fires
        # The first bin whose cumulative count reaches the rank (at least one token into it).
        b = np.minimum((cumulative < np.maximum(rank, 1e-9)[:, None]).sum(axis=1), self.spec.n_bins - 1)
        rows = np.arange(self.d_sae)
        below = np.where(b > 0, cumulative[rows, np.maximum(b - 1, 0)], 0)
        in_bin = np.maximum(self.counts[rows, b], 1)
        fraction = np.clip((rank - below) / in_bin, 0.0, 1.0)
        value = 10 ** (edges[b] + fraction * (edges[b + 1] - edges[b]))
        value = np.clip(value, self.min_positive, self.max)
        return np.where(self.live, value, np.nan)

    def quantile(self, q: float) -> np.ndarray:
        """Per-feature quantile q over all tokens (0 where the feature is silent on more than q of them)."""
        density = self.density
        with np.errstate(divide="ignore", invalid="ignore"):
            p = 1 - (1 - q) / density
        return np.where(self.live & (p > 0), self.positive_quantile(np.clip(np.nan_to_num(p), 0, 1)), 0.0)

    def normaliser(self, q: float = 0.999) -> np.ndarray:
        """The unit of normalised activation: see the module docstring. NaN for dead features."""
        density = self.density
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.clip(1 - (1 - q) / density, 0.5, 1.0)
        return self.positive_quantile(np.nan_to_num(p, nan=0.5))

    def linear_histogram(self, feature: int, n_bins: int = 20) -> dict:
        """An approximate histogram of the feature's positive activations on n_bins equal bins over [0, max].

        Within a log bin (clipped to the observed min and max) values are taken as evenly spread.
        """
        top = float(self.max[feature])
        edges = np.linspace(0.0, top, n_bins + 1)
        if top <= 0:
            return {"edges": edges.tolist(), "counts": [0] * n_bins}
        knots = np.clip(self.spec.edges, self.min_positive[feature], top)
        cumulative = np.concatenate([[0], np.cumsum(self.counts[feature])])
        at_edges = np.round(np.interp(edges, knots, cumulative)).astype(np.int64)
        return {"edges": edges.tolist(), "counts": np.diff(at_edges).tolist()}

    def quantiles(self, feature: int, points: tuple[float, ...] = QUANTILE_POINTS) -> dict[str, float]:
        return {str(q): float(self.quantile(q)[feature]) for q in points}


def levels_of(values: np.ndarray, max_activation: np.ndarray, n_levels: int = N_LEVELS) -> np.ndarray:
    """Activation level 0..n_levels-1 by linear interpolation of each value's feature max."""
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.floor(n_levels * np.asarray(values, dtype=np.float64) / max_activation)
    return np.clip(np.nan_to_num(level), 0, n_levels - 1).astype(np.int64)


def mix_keys(record: np.ndarray, feature: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random key in [0, 1) per (record, feature) (splitmix64 finaliser)."""
    x = (record.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        feature.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(seed)
    )
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class LevelReservoir:
    """A uniform sample of `per_level` records per (feature, activation level)."""

    def __init__(self, max_activation: np.ndarray, per_level: int, n_levels: int = N_LEVELS, seed: int = 0):
        self.max_activation = np.asarray(max_activation, dtype=np.float64)
        self.per_level = per_level
        self.n_levels = n_levels
        self.seed = seed
        n_slots = len(self.max_activation) * n_levels
        self.key = np.full((n_slots, per_level), np.inf)
        self.record = np.full((n_slots, per_level), -1, dtype=np.int64)
        self.value = np.zeros((n_slots, per_level), dtype=np.float32)

    def add(self, record: np.ndarray, feature: np.ndarray, value: np.ndarray) -> None:
        """Offer (record, feature, record-level max activation) triples."""
        record, feature = np.asarray(record, dtype=np.int64), np.asarray(feature, dtype=np.int64)
        value = np.asarray(value, dtype=np.float64)
        keep = value > 0
        record, feature, value = record[keep], feature[keep], value[keep]
        if record.size == 0:
            return
        slot = feature * self.n_levels + levels_of(value, self.max_activation[feature], self.n_levels)
        key = mix_keys(record, feature, self.seed)
        touched = np.unique(slot)
        old_slot = np.repeat(touched, self.per_level)
        old_key, old_record, old_value = (a[touched].ravel() for a in (self.key, self.record, self.value))
        all_slot = np.concatenate([old_slot, slot])
        all_key = np.concatenate([old_key, key])
        all_record = np.concatenate([old_record, record])
        all_value = np.concatenate([old_value, value.astype(np.float32)])
        order = np.lexsort((all_record, all_key, all_slot))
        all_slot, all_key, all_record, all_value = (a[order] for a in (all_slot, all_key, all_record, all_value))
        start = np.searchsorted(all_slot, all_slot, side="left")
        rank = np.arange(len(all_slot)) - start
        kept = rank < self.per_level
        self.key[touched] = np.inf
        self.record[touched] = -1
        self.value[touched] = 0
        self.key[all_slot[kept], rank[kept]] = all_key[kept]
        self.record[all_slot[kept], rank[kept]] = all_record[kept]
        self.value[all_slot[kept], rank[kept]] = all_value[kept]

    def levels(self, feature: int) -> list[list[tuple[int, float]]]:
        """(record, max activation) per level, strongest first within a level."""
        out = []
        for level in range(self.n_levels):
            slot = feature * self.n_levels + level
            pairs = [(int(r), float(v)) for r, v in zip(self.record[slot], self.value[slot]) if r >= 0]
            out.append(sorted(pairs, key=lambda rv: (-rv[1], rv[0])))
        return out


def record_maxima(
    indices: torch.Tensor, values: torch.Tensor, token_record: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record, feature, max activation) triples from token codes: indices/values (tokens, k), record per token."""
    k = indices.shape[1]
    record = token_record.repeat_interleave(k)
    feature = indices.reshape(-1).long()
    value = values.reshape(-1).float()
    positive = value > 0
    record, feature, value = record[positive], feature[positive], value[positive]
    if record.numel() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    width = int(feature.max()) + 1
    pair = record.long() * width + feature
    unique, inverse = torch.unique(pair, return_inverse=True)
    maxima = torch.zeros(len(unique), dtype=torch.float32).scatter_reduce(0, inverse, value, "amax", include_self=False)
    return (unique // width).numpy(), (unique % width).numpy(), maxima.numpy()


@torch.no_grad()
def output_tokens(
    W_dec: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None, compute: torch.dtype, n: int = 10,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top and bottom `n` vocabulary ids (and logit values) per decoder row of W_dec (d_sae, d_in), the
    products in `compute`."""
    device = W_dec.device
    unembed = W_U.float().to(device) * (norm_weight.float().to(device)[None, :] if norm_weight is not None else 1.0)
    unembed_t = unembed.to(compute).t().contiguous()
    top_ids, top_vals, bottom_ids, bottom_vals = [], [], [], []
    for start in range(0, W_dec.shape[0], chunk):
        # Ranked in the compute dtype: converting a (chunk x vocabulary) block to fp32 costs more than the product.
        logits = W_dec[start : start + chunk].to(compute) @ unembed_t
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        top_ids.append(top.indices)
        top_vals.append(top.values.float())
        bottom_ids.append(bottom.indices)
        bottom_vals.append(bottom.values.float())
    return tuple(torch.cat(parts).cpu().numpy() for parts in (top_ids, top_vals, bottom_ids, bottom_vals))


def relative_bin_width(spec: HistogramSpec) -> float:
    return 10 ** ((spec.log_max - spec.log_min) / spec.n_bins) - 1
