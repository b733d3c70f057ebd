"""Stage `activations`: the model runs once over the corpus; the cache holds every hook point later stages read.

Every record a later stage measures is encoded as the app encodes a chat (`sae_engine.chat`): a user turn
in the model's chat template under its default system prompt, followed by the model's own answer for chat
records. Only the plain training texts (books, news, toxic text corpora) stay plain text, SAE training data.
The corpus stage has already cut every text to the preset's token caps.
"""

from __future__ import annotations

import json

from offline_pipeline.activation_cache import collect
from offline_pipeline.corpus.records import ANSWERED_KINDS
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.hooks import collected_hooks
from offline_pipeline.stages.model import load_preset_model
from sae_engine.chat import EncodedChat, encode_text, encode_user_turn
from sae_engine.tokens import special_ids


def encode_record(record: dict, tokenizer) -> EncodedChat:
    """A record as the model reads it (texts arrive cut to the preset's caps by the corpus stage)."""
    if record["split"] == "train" and record["kind"] == "text":
        return encode_text(tokenizer, record["text"])
    return encode_user_turn(tokenizer, record["text"], record["answer"] if record["kind"] in ANSWERED_KINDS else None)


def run_activations(ctx: StageContext) -> dict:
    from offline_pipeline.corpus.build import load_corpus

    preset = ctx.preset
    records = [r.to_dict() for r in load_corpus(ctx.input("corpus") / "corpus.jsonl")]
    loaded = load_preset_model(preset, ctx.settings)
    encoded = [encode_record(r, loaded.tokenizer) for r in records]
    with open(ctx.out / "records.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n" for index, record in enumerate(records))
    hooks = collected_hooks(preset)
    # The refusal filter's openings run in batches of their own: in bf16 a record's activations depend on the batch
    # it runs in, so mixing them in would change every other record's activations, and the SAEs trained on them.
    collect(loaded, encoded, hooks, ctx.out, preset.collect_batch_tokens, apart(records))
    meta = {
        "model_name": loaded.name,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "special_ids": special_ids(loaded.tokenizer).tolist(),
        "context_size": max(len(e.ids) for e in encoded),
        "hooks": hooks,
    }
    write_json_atomic(ctx.out / "meta.json", meta)
    n_train = sum(len(e.ids) for e, r in zip(encoded, records) if r["split"] == "train")
    n_content = sum(sum(e.content) for e in encoded)
    return {
        "tokens": sum(len(e.ids) for e in encoded),
        "content_tokens": n_content,
        "train_tokens": n_train,
        "records": len(records),
        "hooks": len(hooks),
    }


def apart(records: list[dict]) -> list[bool]:
    """The records every stage runs apart from the others: the refusal filter's openings."""
    return [r["kind"] == "opening" for r in records]


def load_meta(ctx: StageContext) -> dict:
    return json.loads((ctx.input("activations") / "meta.json").read_text())
