"""Which of the filter's passes a domain keeps: the features that make the best max-of-features detector.

The app scores a chat for a domain by the strongest normalised activation of the domain's tagged features,
and for all domains together by the strongest of them all. Every tagged feature adds its false alarms to
both scores, so the set is chosen as a whole: a greedy forward selection over the passes of each safety
domain, on the filter's own queries (the domain's prompts against the benign ones, look-alikes and twins
included). Each step adds the (domain, feature) that most raises

    mean over the domains of AUROC(domain score) + AUROC(the all-domains score)

and the selection stops when no addition raises it by `min_gain`, or every domain has `n` features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from offline_pipeline.candidate_filter import FilterPass
from offline_pipeline.evaluation import auroc

Key = tuple[int, int]  # (layer, feature)


@dataclass
class _Detector:
    """The max-of-features scores of one task (a domain, or all domains together) and their AUROC."""

    positive: np.ndarray
    score: np.ndarray
    auroc: float = 0.5

    def with_column(self, column: np.ndarray, negative: np.ndarray) -> float:
        score = np.maximum(self.score, column)
        return auroc(score[self.positive], score[negative])

    def add(self, column: np.ndarray, value: float) -> None:
        self.score = np.maximum(self.score, column)
        self.auroc = value


def detector_selection(
    passes: dict[int, list[FilterPass]],
    normalised: dict[int, np.ndarray],
    row_domains: Sequence[str],
    n: int,
    min_gain: float,
) -> dict[int, list[FilterPass]]:
    """The passes of the features the forward selection picks for each domain that has positive rows.

    `normalised`: layer -> (queries, features) maxima, the same query rows at every layer; `row_domains`: each
    row's domain ("benign" rows are the negatives). Passes of other domains (refusal) are returned untouched.
    """
    rows = np.asarray(row_domains)
    negative = rows == "benign"
    targets = sorted({p.domain for items in passes.values() for p in items if (rows == p.domain).any()})
    if not targets or not negative.any():
        return passes
    candidates = {d: sorted({(layer, p.feature) for layer, items in passes.items() for p in items if p.domain == d}) for d in targets}
    columns = {key: np.nan_to_num(normalised[key[0]][:, key[1]].astype(np.float64)) for keys in candidates.values() for key in keys}
    zero = np.zeros(len(rows))
    domain = {d: _Detector(rows == d, zero) for d in targets}
    joint = _Detector(np.isin(rows, targets), zero)
    chosen: dict[str, set[Key]] = {d: set() for d in targets}
    while True:
        best: tuple[float, str, Key, float, float] | None = None
        for d in targets:
            if len(chosen[d]) >= n:
                continue
            for key in candidates[d]:
                if key in chosen[d]:
                    continue
                own, together = domain[d].with_column(columns[key], negative), joint.with_column(columns[key], negative)
                gain = (own - domain[d].auroc) / len(targets) + together - joint.auroc
                if best is None or gain > best[0]:
                    best = (gain, d, key, own, together)
        if best is None or best[0] < min_gain:
            break
        _, d, key, own, together = best
        chosen[d].add(key)
        domain[d].add(columns[key], own)
        joint.add(columns[key], together)
    return {
        layer: [p for p in items if p.domain not in chosen or (layer, p.feature) in chosen[p.domain]]
        for layer, items in passes.items()
    }
