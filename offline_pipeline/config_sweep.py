"""The SAE configuration sweep (the paper's pre-explanation selection) and its selection rule.

For every (layer, hook kind, k) of the sweep an SAE is trained from the activation cache and
measured, per safety domain, on the Concept Contrastive Query Pairs that the precision-recall
filter and the evaluation do not hold out (`filter` and `explain` splits, English):

- `L0_t` and `I_CDF` at each threshold t of the grid (`offline_pipeline.sweep_metrics`), on
  normalised activations (each feature's unit is its 0.999-quantile normaliser over training tokens);
- `probe_ksparse` (k-sparse probe) and `probe_1d` (best single feature) held-out accuracy
  (`offline_pipeline.probes`);
- `fvu` and `l0` on held-out tokens: overall (domain None) and on each domain's records.

Rows with domain None pool all pairs. The rule that picks the configuration is `SELECTION_RULE`;
it is printed and stored with the run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from offline_pipeline.activation_cache import ActivationCache, iter_chunks
from offline_pipeline.encoding import encode, reconstruction_stats, record_max_matrix
from offline_pipeline.feature_stats import ActivationStats
from offline_pipeline.probes import k_sparse_probe, one_d_probe
from offline_pipeline.sweep_metrics import distinguishing_frequency, i_cdf, l0_t
from sae_engine.topk import TopKSAE

SELECTION_RULE = (
    "Among the configurations whose FVU on held-out tokens is at most {max_fvu}, choose the one with the "
    "most safety features: the number of features whose normalised activation separates a concept query "
    "from its minimally edited twin at t = {t} (L0,t), summed over the safety domains and the sweep layers. "
    "Ties go to the higher mean I_CDF at the same t, then to the lower FVU, then to the smaller k."
)


@dataclass
class PairSet:
    """One domain's contrastive pairs as cache record indices, aligned: query i <-> twin i."""

    queries: list[int]
    twins: list[int]


@dataclass
class SweepData:
    train: np.ndarray  # usable training token positions
    normaliser_tokens: np.ndarray  # positions the per-feature normaliser is measured on
    held_out: np.ndarray  # positions for FVU / L0
    domain_tokens: dict[str, np.ndarray]  # per domain, held-out positions of that domain's records
    pairs: dict[str, PairSet]


def normalisers(
    sae: TopKSAE, cache: ActivationCache, hook: str, positions: np.ndarray, q: float, chunk: int = 8192,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    stats = ActivationStats(sae.d_sae)
    for _, x in iter_chunks(cache, hook, positions, chunk):
        indices, values = encode(sae, x, dtype)
        stats.add(indices.numpy(), values.numpy())
    return stats.normaliser(q)


def _normalise(raw: np.ndarray, normaliser: np.ndarray) -> np.ndarray:
    # Dead features (no normaliser) never fire.
    safe = np.where(np.isfinite(normaliser) & (normaliser > 0), normaliser, np.inf)
    return raw / safe


def evaluate_config(
    sae: TopKSAE,
    cache: ActivationCache,
    hook: str,
    usable: np.ndarray,
    data: SweepData,
    thresholds: tuple[float, ...],
    probe_k: int,
    quantile: float = 0.999,
    dtype: torch.dtype | None = None,
) -> list[dict]:
    """Metric rows (domain, metric, threshold, value) of one trained configuration (encoder products in `dtype`)."""
    rows: list[dict] = []

    def add(domain: str | None, metric: str, value: float, threshold: float | None = None) -> None:
        rows.append({"domain": domain, "metric": metric, "threshold": threshold, "value": _finite(value)})

    overall = reconstruction_stats(sae, cache, hook, data.held_out, dtype=dtype)
    add(None, "fvu", overall["fvu"])
    add(None, "l0", overall["l0"])
    for domain, positions in sorted(data.domain_tokens.items()):
        stats = reconstruction_stats(sae, cache, hook, positions, dtype=dtype)
        add(domain, "fvu", stats["fvu"])
        add(domain, "l0", stats["l0"])
    normaliser = normalisers(sae, cache, hook, data.normaliser_tokens, quantile, dtype=dtype)
    every = sorted({r for p in data.pairs.values() for r in (*p.queries, *p.twins)})
    maxima = _normalise(record_max_matrix(sae, cache, hook, every, usable, dtype=dtype), normaliser)
    row_of = {record: row for row, record in enumerate(every)}
    pooled_pos, pooled_neg = [], []
    for domain, pairs in sorted(data.pairs.items()):
        positive = maxima[[row_of[r] for r in pairs.queries]]
        negative = maxima[[row_of[r] for r in pairs.twins]]
        pooled_pos.append(positive)
        pooled_neg.append(negative)
        _pair_metrics(add, domain, positive, negative, thresholds, probe_k)
    if pooled_pos:
        _pair_metrics(add, None, np.vstack(pooled_pos), np.vstack(pooled_neg), thresholds, probe_k)
    return rows


def _pair_metrics(add, domain, positive: np.ndarray, negative: np.ndarray, thresholds, probe_k: int) -> None:
    frequencies = distinguishing_frequency(positive, negative, thresholds)
    for t, count, expected in zip(thresholds, l0_t(frequencies), i_cdf(frequencies)):
        add(domain, "L0_t", float(count), t)
        add(domain, "I_CDF", float(expected), t)
    n = len(positive)
    if n >= 4:
        features = np.vstack([positive, negative])
        labels = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
        groups = np.concatenate([np.arange(n), np.arange(n)])
        add(domain, "probe_ksparse", k_sparse_probe(features, labels, groups, probe_k).accuracy)
        add(domain, "probe_1d", one_d_probe(features, labels, groups).accuracy)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class Choice:
    hook_kind: str
    k: int
    rule: str
    ranking: list[dict]  # one entry per configuration, best first
    pinned: bool = False
    rule_choice: tuple[str, int] | None = None  # what the rule picked (differs from the choice when pinned)


def choose(
    rows: list[dict], t: float, max_fvu: float, pinned: tuple[str, int] | None = None
) -> Choice:
    """Apply SELECTION_RULE to sweep rows (each with hook_kind, k, layer, domain, metric, threshold, value)."""
    per_config: dict[tuple[str, int], dict] = defaultdict(lambda: {"count": 0.0, "icdf": [], "fvu": []})
    for row in rows:
        key = (row["hook_kind"], row["k"])
        entry = per_config[key]
        if row["domain"] is None and row["metric"] == "fvu" and row["value"] is not None:
            entry["fvu"].append(row["value"])
        if row["domain"] is not None and row["threshold"] is not None and math.isclose(row["threshold"], t):
            if row["metric"] == "L0_t" and row["value"] is not None:
                entry["count"] += row["value"]
            if row["metric"] == "I_CDF" and row["value"] is not None:
                entry["icdf"].append(row["value"])
    if not per_config:
        raise ValueError("the sweep produced no results to choose from")
    ranking = []
    for (kind, k), entry in per_config.items():
        fvu = float(np.mean(entry["fvu"])) if entry["fvu"] else math.inf
        icdf = float(np.mean(entry["icdf"])) if entry["icdf"] else 0.0
        ranking.append(
            {"hook_kind": kind, "k": k, "safety_feature_count": entry["count"], "mean_I_CDF": icdf, "fvu": fvu, "eligible": fvu <= max_fvu}
        )
    ranking.sort(key=lambda r: (not r["eligible"], -r["safety_feature_count"], -r["mean_I_CDF"], r["fvu"], r["k"]))
    rule = SELECTION_RULE.format(max_fvu=max_fvu, t=t)
    best = ranking[0]
    if not best["eligible"]:
        raise ValueError(f"no configuration reaches FVU <= {max_fvu}: {ranking}")
    picked = (best["hook_kind"], int(best["k"]))
    if pinned:
        return Choice(pinned[0], pinned[1], rule + f" Pinned by the preset to {pinned[0]}, k={pinned[1]}.", ranking, True, picked)
    return Choice(picked[0], picked[1], rule, ranking, False, picked)


def ranking_table(choice: Choice) -> str:
    lines = [f"{'hook':<11}{'k':>5}{'count':>8}{'I_CDF':>8}{'FVU':>8}  eligible"]
    for r in choice.ranking:
        lines.append(
            f"{r['hook_kind']:<11}{r['k']:>5}{r['safety_feature_count']:>8.0f}{r['mean_I_CDF']:>8.3f}{r['fvu']:>8.3f}  {r['eligible']}"
        )
    return "\n".join(lines)
