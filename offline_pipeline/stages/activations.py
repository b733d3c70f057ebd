"""Stage `activations`: the model runs once over the corpus; the cache holds every hook point later stages read."""

from __future__ import annotations

import json

from offline_pipeline.activation_cache import collect, tokenize_records
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.hooks import collected_hooks
from offline_pipeline.stages.model import load_preset_model
from sae_engine.tokens import special_ids


def run_activations(ctx: StageContext) -> dict:
    from offline_pipeline.corpus.build import load_corpus

    preset = ctx.preset
    records = load_corpus(ctx.input("corpus") / "corpus.jsonl")
    loaded = load_preset_model(preset, ctx.settings)
    caps = [preset.corpus.max_tokens_per_record if r.split == "train" else preset.corpus.max_query_tokens for r in records]
    token_lists = tokenize_records([r.text for r in records], loaded.tokenizer, caps)
    with open(ctx.out / "records.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"index": index, **record.to_dict()}, ensure_ascii=False) + "\n" for index, record in enumerate(records))
    hooks = collected_hooks(preset)
    collect(loaded, token_lists, hooks, ctx.out, preset.collect_batch_tokens)
    meta = {
        "model_name": loaded.name,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "special_ids": special_ids(loaded.tokenizer).tolist(),
        "context_size": max(len(t) for t in token_lists),
        "hooks": hooks,
    }
    write_json_atomic(ctx.out / "meta.json", meta)
    n_train = sum(len(t) for t, r in zip(token_lists, records) if r.split == "train")
    return {"tokens": sum(len(t) for t in token_lists), "train_tokens": n_train, "records": len(records), "hooks": len(hooks)}


def load_meta(ctx: StageContext) -> dict:
    return json.loads((ctx.input("activations") / "meta.json").read_text())
