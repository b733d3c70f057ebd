"""Stage `filter`: the precision-recall candidates per layer, from the features' maxima on the labelled queries."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.candidate_filter import FilterPass, QueryLabel, joint_filter
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.presets import Preset
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.stats import load_stats, normalised_queries


def run_filter(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    result: dict[str, list[dict]] = {}
    for layer in preset.layers:
        stats = load_stats(ctx.input("stats"), layer)
        rows = [row for row, record in enumerate(stats["query_records"]) if _filter_query(cache.records[record], preset)]
        labels = []
        for row in rows:
            r = cache.records[stats["query_records"][row]]
            safety = r["domain"] in SAFETY_DOMAINS
            labels.append(QueryLabel(r["domain"] if safety else None, r["concept"] if safety else None, r["domain"] == "benign"))
        passes = joint_filter(normalised_queries(stats)[rows], labels, preset.filter)
        result[str(layer)] = [asdict(p) for p in passes]
    write_json_atomic(ctx.out / "passes.json", result)
    per_layer = {layer: len({p["feature"] for p in passes}) for layer, passes in result.items()}
    domains = Counter(p["domain"] for passes in result.values() for p in passes if p["concept"] is None)
    return {"candidates_per_layer": per_layer, "domain_passes": dict(domains), "labelled_queries": len(rows)}


def _filter_query(record: dict, preset: Preset) -> bool:
    """The filter's labelled queries: the `filter` split, and the contrastive pairs outside the `score` split."""
    if record["kind"] == "chat" or record["language"] not in preset.filter_languages:
        return False
    if record["pair_id"] is not None:
        return record["split"] in ("filter", "explain")
    return record["split"] == "filter"


def load_passes(folder: Path) -> dict[int, list[FilterPass]]:
    raw = json.loads((folder / "passes.json").read_text())
    return {int(layer): [FilterPass(**p) for p in passes] for layer, passes in raw.items()}
