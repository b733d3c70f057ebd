"""Deterministic splits from content hashes: the same text lands in the same split in every build.

- `train` (~70%): SAE training text.
- `filter` (~10%): held out for the candidate precision-recall filter.
- `explain` (~10%): held out for explanation examples.
- `score` (~10%): held out for simulation-scoring queries.

A record's split is decided by its text alone, so exact duplicates across sources can never straddle
two splits. Concept Contrastive Query Pairs are split by `pair_id`, so a query, its twin and their
translations always stay together; they are evaluation data for the config sweep and the filter and
never enter `train` (60% filter, 20% explain, 20% score). Chat records inherit their prompt's split.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from offline_pipeline.corpus.records import Record

# Cumulative upper bounds on a hash drawn uniformly from [0, 1).
RECORD_SPLITS: tuple[tuple[str, float], ...] = (("train", 0.70), ("filter", 0.80), ("explain", 0.90), ("score", 1.0))
PAIR_SPLITS: tuple[tuple[str, float], ...] = (("filter", 0.60), ("explain", 0.80), ("score", 1.0))


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def choose(key: str, bounds: tuple[tuple[str, float], ...]) -> str:
    value = unit_hash(key)
    for name, upper in bounds:
        if value < upper:
            return name
    return bounds[-1][0]


def split_of(record: Record) -> str:
    if record.pair_id is not None:
        return choose(f"pair:{record.pair_id}", PAIR_SPLITS)
    return choose(f"text:{' '.join(record.text.split())}", RECORD_SPLITS)


def assign_splits(records: list[Record]) -> list[Record]:
    return [replace(record, split=split_of(record)) for record in records]
