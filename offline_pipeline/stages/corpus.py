"""Stage `corpus`: the records every later stage reads, with the model's answers to some prompts.

Every English prompt of the splits the filter and the evaluation read (`filter`, `score`) is labelled
refused or not from the opening of the model's own greedy answer (`sae_engine.refusal`), generated once and
cached; `chat_prompts` prompts also get whole answers, kept as chat records, and `refusal_openings` labelled
prompts a chat record that ends with their answer's opening (the refusal features are found on those).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

from offline_pipeline.corpus.project_harmful import HARMFUL_SOURCE
from offline_pipeline.corpus.records import Record
from offline_pipeline.presets import CorpusPreset
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.model import load_preset_model


def select_records(records: list[Record], p: CorpusPreset) -> list[Record]:
    """At most `p.max_records_per_group` records (or the domain's cap) and `p.max_pairs_per_group` pairs per
    (split, domain), in content-hash order. A pair's halves and translations stay together. The project's own
    prompts (look-alikes, benign phrasings) are few and exist to test the filter: the domain caps, which bound
    large sources, never drop them (they still count, so the other sources keep their share). The project's harmful
    prompts are left out where the preset says so."""
    cap, pair_cap = p.max_records_per_group, p.max_pairs_per_group
    train_caps, query_caps = dict(p.train_caps), dict(p.query_caps)
    pair_groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        if r.pair_id is not None and r.language == "en" and not r.is_lookalike:
            pair_groups[(r.split, r.domain)].add(r.pair_id)
    kept_pairs = {pid for group in pair_groups.values() for pid in sorted(group)[:pair_cap]}
    counts: Counter = Counter()
    out = []
    for r in sorted(records, key=lambda r: r.record_id):
        if not p.project_harmful and r.source == HARMFUL_SOURCE:
            continue
        if r.pair_id is not None:
            if r.pair_id in kept_pairs:
                out.append(r)
        else:
            domain_caps = train_caps if r.split == "train" else query_caps
            limit = domain_caps.get(r.domain, cap)
            exempt = r.label_origin == "project" and r.domain in domain_caps
            if limit is None or counts[(r.split, r.domain)] < limit or exempt:
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


def truncated(record: Record, tokenizer, p: CorpusPreset) -> Record:
    """The record with its text cut to the preset's token cap, so every stage (and the model's answer) sees
    the same text; the record keeps its id."""
    cap = p.max_tokens_per_record if record.split == "train" else p.max_query_tokens
    ids = tokenizer(record.text, add_special_tokens=False)["input_ids"]
    return record if len(ids) <= cap else replace(record, text=tokenizer.decode(ids[:cap]))


def refusal_label_selection(records: list[Record], splits: tuple[str, ...]) -> list[Record]:
    return [r for r in records if r.kind == "prompt" and r.language == "en" and r.split in splits]


def run_corpus(ctx: StageContext) -> dict:
    from offline_pipeline.corpus.build import collect_records, write_records
    from offline_pipeline.corpus.chat_records import (
        AnswerCache,
        answers_path,
        chat_records,
        opening_records,
        refusal_labels,
    )

    settings, p = ctx.settings, ctx.preset.corpus
    loaded = load_preset_model(ctx.preset, settings)
    records = [truncated(r, loaded.tokenizer, p) for r in select_records(collect_records(settings.data_dir), p)]
    cache = AnswerCache(answers_path(settings.data_dir))
    try:
        chosen = refusal_label_selection(records, p.refusal_label_splits)
        labelled = {r.record_id: r for r in refusal_labels(chosen, loaded, cache)}
        records = [labelled.get(r.record_id, r) for r in records]
        if p.chat_prompts:
            records += chat_records(chat_prompt_selection(records, p.chat_prompts), loaded, cache)
        records += opening_records(list(labelled.values()), p.refusal_openings)
    finally:
        cache.close()
    write_records(records, ctx.out / "corpus.jsonl")
    refused = Counter((r.domain, r.refused) for r in labelled.values())
    return {
        "records": len(records),
        "by_split": dict(Counter(r.split for r in records)),
        "by_kind": dict(Counter(r.kind for r in records)),
        "refusal_labels": len(labelled),
        "refused_by_domain": {d: f"{refused[(d, True)]}/{refused[(d, True)] + refused[(d, False)]}" for d, _ in sorted(refused)},
    }
