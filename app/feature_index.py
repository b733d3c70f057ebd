"""Column arrays over a set's features in listing order, so listing and search filter in numpy.

Position i is the i-th feature of the listing (explained first, then by headline score, layer,
index). A search hit is an explanation id; `explanation_rank` maps it to its feature's position,
so ordering, de-duplicating and filtering thousands of hits is one `np.unique` and a few masks.
"""

from __future__ import annotations

import numpy as np

from app.queries import FeatureMeta


def listing_key(meta: FeatureMeta) -> tuple:
    return (not meta.explained, -(meta.score if meta.score is not None else -1.0), meta.layer, meta.index)


class FeatureIndex:
    def __init__(self, catalog: dict[str, FeatureMeta], owners: dict[int, str]) -> None:
        self.ranked = sorted(catalog.values(), key=listing_key)
        position = {meta.feature_id: i for i, meta in enumerate(self.ranked)}
        self.layer = np.array([m.layer for m in self.ranked], dtype=np.int64)
        self.score = np.array([np.nan if m.score is None else m.score for m in self.ranked], dtype=np.float64)
        self.domain_bit = {d: 1 << i for i, d in enumerate(sorted({d for m in self.ranked for d in m.domains}))}
        self.domains = np.array([sum(self.domain_bit[d] for d in m.domains) for m in self.ranked], dtype=np.int64)
        size = max(owners, default=-1) + 1
        self.explanation_rank = np.full(size, -1, dtype=np.int64)
        for explanation_id, feature_id in owners.items():
            self.explanation_rank[explanation_id] = position[feature_id]

    def mask(self, layer: int | None, domain: str | None, min_score: float | None) -> np.ndarray:
        keep = np.ones(len(self.ranked), dtype=bool)
        if layer is not None:
            keep &= self.layer == layer
        if domain is not None:
            keep &= (self.domains & self.domain_bit.get(domain, 0)) != 0
        if min_score is not None:
            keep &= self.score >= min_score  # NaN (no score) compares False
        return keep

    def select(self, layer: int | None, domain: str | None, min_score: float | None,
               explanation_ids: list[int] | None = None) -> np.ndarray:
        """Positions (ascending = listing order) of the features passing the filters, optionally only search hits."""
        keep = self.mask(layer, domain, min_score)
        if explanation_ids is None:
            return np.flatnonzero(keep)
        ids = np.asarray(explanation_ids, dtype=np.int64)
        ids = ids[ids < len(self.explanation_rank)]
        positions = np.unique(self.explanation_rank[ids])
        positions = positions[positions >= 0]  # explanations of other sets
        return positions[keep[positions]]
