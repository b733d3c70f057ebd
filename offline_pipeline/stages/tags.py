"""The safety tags: the precision-recall candidates whose explanation passes the score gate, with their domains."""

from __future__ import annotations

from pathlib import Path

from offline_pipeline.candidate_filter import score_gate
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.filter import load_passes
from offline_pipeline.stages.jsonl import read_jsonl


def gate_scores(explain_dir: Path, method: str) -> dict[str, float | None]:
    """feature id -> the score of `method` that decides tagging (the first method of the preset)."""
    return {s["feature_id"]: s["value"] for s in read_jsonl(explain_dir / "scores.jsonl") if s["method"] == method}


def safety_tags(ctx: StageContext) -> dict[str, list[str]]:
    """feature id -> domains, for the candidates that pass the score gate."""
    passes = load_passes(ctx.input("filter"))
    candidates = {f"{layer}_{p.feature}": set() for layer, ps in passes.items() for p in ps}
    for layer, ps in passes.items():
        for p in ps:
            candidates[f"{layer}_{p.feature}"].add(p.domain)
    scores = gate_scores(ctx.input("explain"), ctx.preset.explain.methods[0])
    kept = score_gate(sorted(candidates), scores, ctx.preset.explain.min_score)
    return {feature_id: sorted(candidates[feature_id]) for feature_id in kept}
