"""Stage `evaluate`: how well the tagged features detect each domain and refusal on the held-out queries,
and across languages (queries encoded as chats, content tokens only: a diagnostic on the corpus's own
held-out split; `make bench-heldout` measures prompts written apart from every source, through the app)."""

from __future__ import annotations

from collections import defaultdict

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.candidate_filter import REFUSAL
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.evaluation import detection, domain_scores, language_gap, refusal_detection
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.filter import load_passes
from offline_pipeline.stages.stats import load_stats, normalised_queries
from offline_pipeline.stages.tags import safety_tags


def run_evaluate(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    tags = safety_tags(ctx)
    by_domain: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for feature_id, domains in tags.items():
        layer, index = map(int, feature_id.split("_"))
        for domain in domains:
            by_domain[domain].append((layer, index))
    normalised, query_records = {}, None
    for layer in preset.layers:
        stats = load_stats(ctx.input("stats"), layer)
        normalised[layer] = normalised_queries(stats)
        query_records = stats["query_records"]
    records = [cache.records[i] for i in query_records]
    scores = domain_scores(normalised, by_domain, len(records))
    # The same measure over every feature that passed the precision-recall filter, before the explanation-score cut.
    passed: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for layer, passes in load_passes(ctx.input("filter")).items():
        for p in passes:
            passed[p.domain].add((layer, p.feature))
    candidates = {domain: sorted(features) for domain, features in passed.items()}
    result = {
        "refusal": refusal_detection(records, domain_scores(normalised, by_domain, len(records), (REFUSAL,))[REFUSAL]),
        "detection": detection(records, scores),
        "detection_candidates": detection(records, domain_scores(normalised, candidates, len(records))),
        "candidates_per_domain": {d: len(candidates.get(d, [])) for d in SAFETY_DOMAINS},
        "language_gap": language_gap(records, scores, preset.filter.tau),
        "tagged_per_domain": {d: len(by_domain.get(d, [])) for d in SAFETY_DOMAINS},
        "tagged_per_layer_domain": {
            str(layer): {d: sum(1 for lay, _ in by_domain.get(d, []) if lay == layer) for d in SAFETY_DOMAINS}
            for layer in preset.layers
        },
    }
    write_json_atomic(ctx.out / "evaluation.json", result)
    return {
        **{d: r["auroc_vs_benign"] for d, r in result["detection"].items()},
        "refusal_auroc": result["refusal"]["auroc"],
        "tagged_refusal": len(by_domain.get(REFUSAL, [])),
    }
