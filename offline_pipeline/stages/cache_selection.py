"""Which records and tokens of the activation cache a stage reads.

Three token masks, all without special tokens and extreme-norm outliers:
- *trainable*: what SAEs are trained on; every token but the shared chat prefix (template and system
  prompt before the first content token, identical in every chat record);
- *counted*: content tokens only (a user's or an answer's words): what statistics, the filter, the
  explanations and the evaluation measure, as the app counts them;
- *template*: the non-content tokens of chat-encoded records: where a feature must not fire on benign chats.
"""

from __future__ import annotations

import numpy as np

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.stages.activations import apart
from sae_engine.training import SAETrainConfig

OUTLIER_FACTOR = SAETrainConfig().outlier_factor


def usable_tokens(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    # The outlier limit comes from the records not run apart, so adding apart records (the refusal
    # openings) leaves every other record's mask, hence the SAEs trained on them, as it was.
    reference = np.repeat(~np.asarray(apart(cache.records), dtype=bool), np.diff(cache.offsets))
    return cache.usable(hook, np.asarray(meta["special_ids"]), OUTLIER_FACTOR, reference)


def trainable_tokens(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    return usable_tokens(cache, meta, hook) & ~cache.shared_prefix()


def counted_tokens(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    return usable_tokens(cache, meta, hook) & cache.content


def template_tokens(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    return usable_tokens(cache, meta, hook) & ~cache.content


def usable_positions(cache: ActivationCache, records: list[int], usable: np.ndarray) -> np.ndarray:
    positions = cache.token_span(records)
    return positions[usable[positions]]


def split_records(cache: ActivationCache, splits: tuple[str, ...], pairs: bool | None = None) -> list[int]:
    return [
        i
        for i, r in enumerate(cache.records)
        if r["split"] in splits and (pairs is None or (r["pair_id"] is not None) == pairs)
    ]
