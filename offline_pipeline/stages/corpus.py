"""Stage `corpus`: the records every later stage reads, with the model's answers to some prompts."""

from __future__ import annotations

from collections import Counter, defaultdict

from offline_pipeline.corpus.records import Record
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.model import load_preset_model


def select_records(records: list[Record], cap: int | None, pair_cap: int | None) -> list[Record]:
    """At most `cap` records and `pair_cap` pairs per (split, domain), in content-hash order.

    A pair's halves and translations stay together.
    """
    pair_groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        if r.pair_id is not None and r.language == "en" and not r.is_lookalike:
            pair_groups[(r.split, r.domain)].add(r.pair_id)
    kept_pairs = {pid for group in pair_groups.values() for pid in sorted(group)[:pair_cap]}
    counts: Counter = Counter()
    out = []
    for r in sorted(records, key=lambda r: r.record_id):
        if r.pair_id is not None:
            if r.pair_id in kept_pairs:
                out.append(r)
        elif cap is None or counts[(r.split, r.domain)] < cap:
            counts[(r.split, r.domain)] += 1
            out.append(r)
    return out


def chat_prompt_selection(records: list[Record], n: int) -> list[Record]:
    """`n` prompt records (no pair halves), round-robin over (split, domain) so every group gets answers."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.record_id):
        if r.kind == "prompt" and r.pair_id is None and r.language == "en":
            groups[(r.split, r.domain)].append(r)
    chosen: list[Record] = []
    depth = 0
    while len(chosen) < n and any(depth < len(g) for g in groups.values()):
        for key in sorted(groups):
            if depth < len(groups[key]) and len(chosen) < n:
                chosen.append(groups[key][depth])
        depth += 1
    return chosen


def run_corpus(ctx: StageContext) -> dict:
    from offline_pipeline.corpus.build import collect_records, write_records
    from offline_pipeline.corpus.chat_records import (
        AnswerCache,
        answers_path,
        chat_records,
    )

    settings, p = ctx.settings, ctx.preset.corpus
    records = select_records(collect_records(settings.data_dir), p.max_records_per_group, p.max_pairs_per_group)
    if p.chat_prompts:
        loaded = load_preset_model(ctx.preset, settings)
        cache = AnswerCache(answers_path(settings.data_dir))
        try:
            records += chat_records(chat_prompt_selection(records, p.chat_prompts), loaded, cache)
        finally:
            cache.close()
    write_records(records, ctx.out / "corpus.jsonl")
    return {
        "records": len(records),
        "by_split": dict(Counter(r.split for r in records)),
        "by_kind": dict(Counter(r.kind for r in records)),
    }
