"""Stage `filter`: the safety features per layer, from the features' maxima on the labelled queries.

Precision and recall over the labelled queries (domains and concepts on the user's prompts, refusal on the
model's answers to labelled prompts: the chat records the corpus keeps), then the artifact rules
(pairs, template; `offline_pipeline.candidate_filter`). A safety domain no layer covers takes its passes at the
fallback precision (`cover_blank_domains`); each safety domain then keeps the features that together make its
best max-of-features detector on these queries (`detector_selection`), and every domain at most its most precise
ones (`most_precise`).
`passes.json` keeps what passed, `rejected.json` what precision and recall alone would have tagged, with the rule
it broke.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.candidate_filter import (
    FilterConfig,
    FilterPass,
    Pair,
    QueryLabel,
    Rejection,
    artifact_rules,
    joint_filter,
    most_precise,
    refusal_passes,
)
from offline_pipeline.corpus.records import ANSWERED_KINDS, SAFETY_DOMAINS
from offline_pipeline.detector_selection import detector_selection
from offline_pipeline.presets import Preset
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.stats import load_stats, normalised_queries


def run_filter(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    queries = {layer: _layer_queries(cache, load_stats(ctx.input("stats"), layer), preset) for layer in preset.layers}
    outcome = {layer: _layer_filter(q, preset.filter) for layer, q in queries.items()}
    uncovered = cover_blank_domains(queries, outcome, preset.filter)
    kept_passes = selected_passes(queries, {layer: kept for layer, (kept, _) in outcome.items()}, preset.filter)
    result: dict[str, list[dict]] = {}
    rejected: dict[str, list[dict]] = {}
    for layer, (_, dropped) in outcome.items():
        q, kept = queries[layer], kept_passes[layer]
        result[str(layer)] = [asdict(p) for p in kept]
        rejected[str(layer)] = [{**asdict(r), "why": why_rejected(r, q.fires, q.records, q.pairs)} for r in dropped]
    write_json_atomic(ctx.out / "passes.json", result)
    write_json_atomic(ctx.out / "rejected.json", rejected)
    per_layer = {layer: len({p["feature"] for p in passes}) for layer, passes in result.items()}
    domains = Counter(p["domain"] for passes in result.values() for p in passes if p["concept"] is None)
    reasons = Counter(r["reason"] for items in rejected.values() for r in items)
    why = Counter(r["why"] for items in rejected.values() for r in items)
    return {
        "candidates_per_layer": per_layer,
        "fallback_domains": sorted({p["domain"] for passes in result.values() for p in passes if p["domain"] in uncovered}),
        "domain_passes": dict(domains),
        "labelled_queries": len(next(iter(queries.values())).records) if queries else 0,
        "rejected_passes": dict(reasons),
        "rejected_why": dict(why),
        "rejected_features": {reason: len({(layer, r["feature"]) for layer, items in rejected.items() for r in items if r["reason"] == reason}) for reason in reasons},
    }


def selected_passes(
    queries: dict[int, LayerQueries], passes: dict[int, list[FilterPass]], config: FilterConfig
) -> dict[int, list[FilterPass]]:
    """The passes each domain keeps: its best max-of-features detector's (with `config.min_detector_gain`), then
    at most `config.max_per_domain` of the most precise."""
    if config.min_detector_gain is not None and queries:
        first = next(iter(queries.values()))
        cap = config.max_per_domain or first.normalised.shape[1]
        normalised = {layer: q.normalised for layer, q in queries.items()}
        passes = detector_selection(passes, normalised, [r["domain"] for r in first.records], cap, config.min_detector_gain)
    if config.max_per_domain is not None:
        passes = most_precise(passes, config.max_per_domain)
    return passes


@dataclass
class LayerQueries:
    """One layer's labelled filter queries: their records, maxima (normalised) and the pairs among them; and
    whether the features fire on the answered chats with a refusal label (`refusal_fires`, `refused`)."""

    records: list[dict]
    normalised: np.ndarray
    fires: np.ndarray
    template_fires: np.ndarray
    pairs: list[Pair]
    refusal_fires: np.ndarray
    refused: np.ndarray


def _layer_queries(cache: ActivationCache, stats: dict[str, np.ndarray], preset: Preset) -> LayerQueries:
    records = [cache.records[i] for i in stats["query_records"]]
    rows = [row for row, record in enumerate(records) if _filter_query(record, preset)]
    answered = [row for row, record in enumerate(records) if _refusal_query(record, preset)]
    normalised, template = normalised_queries(stats), normalised_queries(stats, "template_max")
    return layer_queries(
        [records[row] for row in rows], normalised[rows], template[rows], preset.filter.tau,
        normalised[answered], np.array([bool(records[row]["refused"]) for row in answered], dtype=bool),
    )


def cover_blank_domains(
    queries: dict[int, LayerQueries], outcome: dict[int, tuple[list[FilterPass], list[Rejection]]], config: FilterConfig
) -> list[str]:
    """The safety domains no layer's feature passes for; with `config.fallback_precision`, each gets the
    passes (all rules but the looser precision) it has at that precision, added to `outcome` in place.

    A safety map with a blank domain hides that domain from every chat; its fallback passes keep their
    (lower) precision in the record."""
    covered = {p.domain for kept, _ in outcome.values() for p in kept}
    uncovered = [d for d in SAFETY_DOMAINS if d not in covered]
    if config.fallback_precision is None or not uncovered:
        return uncovered
    loose = replace(config, min_precision=config.fallback_precision)
    for layer, q in queries.items():
        kept = outcome[layer][0]
        kept.extend(p for p in _layer_filter(q, loose)[0] if p.domain in uncovered)
        kept.sort(key=lambda p: (p.feature, p.domain, p.concept or ""))
    return uncovered


def layer_queries(
    records: list[dict], normalised: np.ndarray, template_normalised: np.ndarray, tau: float,
    refusal_normalised: np.ndarray | None = None, refused: np.ndarray | None = None,
) -> LayerQueries:
    refusal = np.zeros((0, normalised.shape[1])) if refusal_normalised is None else refusal_normalised
    return LayerQueries(records, normalised, normalised > tau, template_normalised > tau, _pairs(records),
                        refusal > tau, np.zeros(0, dtype=bool) if refused is None else refused)


def _layer_filter(q: LayerQueries, config: FilterConfig) -> tuple[list[FilterPass], list[Rejection]]:
    """The layer's passes (domains, concepts, refusal) that hold the artifact rules, and the rejected ones."""
    candidates = joint_filter(q.normalised, [_label(r) for r in q.records], config)
    if q.refused.size:
        candidates += refusal_passes(q.refusal_fires, q.refused, config)
    benign = np.array([r["domain"] == "benign" for r in q.records], dtype=bool)
    return artifact_rules(candidates, q.fires, q.template_fires, benign, q.pairs, config)


def why_rejected(rejection: Rejection, fires: np.ndarray, records: list[dict], pairs: list[Pair]) -> str:
    """What a rejected feature fires on instead of its concept: the chat template; a phrasing style (it fires on
    the benign rephrasings of one style, e.g. past tense, at least as often as on its concept's queries); the
    words a query shares with its twin (it fires on the twins at least half as often as on the queries); else
    it simply fires too rarely on the pairs."""
    column = fires[:, rejection.feature]
    if rejection.reason == "template":
        return "template"
    members = np.array([r["domain"] == rejection.domain and (rejection.concept is None or r["concept"] == rejection.concept) for r in records])
    own = column[members].mean() if members.any() else 0.0
    styles = defaultdict(list)
    for row, r in enumerate(records):
        if r["domain"] == "benign" and r["source"].startswith(("project:benign_phrasings", "project:jailbreak")):
            styles[r["source_label"]].append(row)
    style_rates = {style: column[rows].mean() for style, rows in styles.items()}
    if style_rates:
        style, rate = max(style_rates.items(), key=lambda kv: kv[1])
        if rate > 0 and rate >= own:
            return f"style:{style}"
    chosen = [p for p in pairs if p.domain == rejection.domain and (rejection.concept is None or p.concept == rejection.concept)]
    if chosen:
        on_query = column[[p.query for p in chosen]].mean()
        on_twin = column[[p.twin for p in chosen]].mean()
        if on_query > 0 and on_twin >= 0.5 * on_query:
            return "shared words"
    return "rare on pairs"


def _label(record: dict) -> QueryLabel:
    safety = record["domain"] in SAFETY_DOMAINS
    return QueryLabel(record["domain"] if safety else None, record["concept"] if safety else None, record["domain"] == "benign")


def _pairs(records: list[dict]) -> list[Pair]:
    """The contrastive pairs among the rows: (query row, twin row) with the query's domain and concept."""
    halves: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for row, r in enumerate(records):
        if r["pair_id"] is not None:
            halves[(r["pair_id"], r["language"])]["twin" if r["is_lookalike"] else "query"] = row
    out = []
    for key in sorted(halves):
        h = halves[key]
        if "query" in h and "twin" in h:
            query = records[h["query"]]
            out.append(Pair(h["query"], h["twin"], query["domain"], query["concept"]))
    return out


def _filter_query(record: dict, preset: Preset) -> bool:
    """The filter's labelled queries: user requests (prompts, as the app sees them; plain texts train SAEs but are
    not what a chat asks) of the `train` and `filter` splits, and the contrastive pairs outside the `score` split.
    The `explain` and `score` splits stay apart for explanations and evaluation."""
    if record["kind"] != "prompt" or record["language"] not in preset.filter_languages:
        return False
    if record["pair_id"] is not None:
        return record["split"] in ("filter", "explain")
    return record["split"] in ("train", "filter")


def _refusal_query(record: dict, preset: Preset) -> bool:
    """The refusal filter's queries: the model's answers (chat records) to labelled prompts of the filter's splits."""
    return (record["kind"] in ANSWERED_KINDS and record["refused"] is not None and record["language"] in preset.filter_languages
            and record["split"] in ("train", "filter"))


def load_passes(folder: Path) -> dict[int, list[FilterPass]]:
    raw = json.loads((folder / "passes.json").read_text())
    return {int(layer): [FilterPass(**p) for p in passes] for layer, passes in raw.items()}
