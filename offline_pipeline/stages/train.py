"""Stage `train`: the final SAEs, one per layer under the chosen hook kind and k, saved as SAELens folders."""

from __future__ import annotations

from pathlib import Path

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.cache_training import train_from_cache
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.activations import load_meta
from offline_pipeline.stages.cache_selection import split_records, trainable_tokens, usable_positions
from offline_pipeline.stages.choose import load_choice
from offline_pipeline.stages.hooks import hook_name
from offline_pipeline.stages.model import load_preset_model
from offline_pipeline.stages.sae_config import train_config
from sae_engine.checkpoints import load_saelens, save_saelens
from sae_engine.models import resolve_device


def sae_folder(train_dir: Path, hook: str) -> Path:
    return train_dir / "saes" / hook


def run_train(ctx: StageContext) -> dict:
    from sae_engine.metrics import evaluate_saes
    from sae_engine.tokens import pack_texts

    preset = ctx.preset
    choice = load_choice(ctx)
    cache = ActivationCache.open(ctx.input("activations"))
    meta = load_meta(ctx)
    config = train_config(preset, int(choice["k"]))
    hooks = [hook_name(layer, choice["hook_kind"]) for layer in preset.layers]
    loaded = load_preset_model(preset, ctx.settings)
    saes = {}
    if preset.train.from_cache:
        for hook in hooks:
            positions = usable_positions(cache, split_records(cache, ("train",)), trainable_tokens(cache, meta, hook))
            trained = train_from_cache(
                cache, hook, positions, config, preset.train.train_tokens, meta["model_name"], meta["context_size"], loaded.device
            )
            saes[hook] = trained.sae
    else:
        from sae_engine.training import MultiSAETrainer

        texts = [r["text"] for r in cache.records if r["split"] == "train"]

        def batches():
            while True:  # epochs over the training texts until the token budget is reached
                yield from pack_texts(
                    texts, loaded.tokenizer, context_size=preset.corpus.max_tokens_per_record, batch_rows=preset.train.stream_batch_rows
                )

        trained_all = MultiSAETrainer(loaded, hooks, config).train(batches(), preset.train.train_tokens)
        saes = {hook: t.sae for hook, t in trained_all.items()}
    eval_texts = [r["text"] for r in cache.records if r["split"] == "explain" and r["pair_id"] is None]
    eval_batch = next(pack_texts(eval_texts, loaded.tokenizer, context_size=128, batch_rows=preset.train.eval_rows))
    for sae in saes.values():
        sae.to(loaded.device)
    metrics = evaluate_saes(loaded, saes, [eval_batch])
    out = {}
    for hook, sae in saes.items():
        sae.cpu()
        save_saelens(sae, sae_folder(ctx.out, hook), hook, meta["model_name"], {"metrics": metrics[hook].as_dict()})
        out[hook] = metrics[hook].as_dict()
    write_json_atomic(ctx.out / "metrics.json", out)
    return {hook: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)} for hook, m in out.items()}


def load_saes(ctx: StageContext) -> dict[int, tuple[str, object]]:
    """layer -> (hook, TopKSAE) of the trained set."""
    choice = load_choice(ctx)
    device = resolve_device(ctx.preset.device)
    out = {}
    for layer in ctx.preset.layers:
        hook = hook_name(layer, choice["hook_kind"])
        out[layer] = (hook, load_saelens(sae_folder(ctx.input("train"), hook), device=str(device)).sae)
    return out
