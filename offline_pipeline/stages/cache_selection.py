"""Which records and tokens of the activation cache a stage reads."""

from __future__ import annotations

import numpy as np

from offline_pipeline.activation_cache import ActivationCache
from sae_engine.training import SAETrainConfig

OUTLIER_FACTOR = SAETrainConfig().outlier_factor


def usable_tokens(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    return cache.usable(hook, np.asarray(meta["special_ids"]), OUTLIER_FACTOR)


def usable_positions(cache: ActivationCache, records: list[int], usable: np.ndarray) -> np.ndarray:
    positions = cache.token_span(records)
    return positions[usable[positions]]


def split_records(cache: ActivationCache, splits: tuple[str, ...], pairs: bool | None = None) -> list[int]:
    return [
        i
        for i, r in enumerate(cache.records)
        if r["split"] in splits and (pairs is None or (r["pair_id"] is not None) == pairs)
    ]
