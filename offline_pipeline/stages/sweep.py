"""Stage `sweep`: a small SAE per candidate configuration, with the metrics the choice ranks them by."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.cache_training import train_from_cache
from offline_pipeline.config_sweep import PairSet, SweepData, evaluate_config
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.encoding import sae_precision
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.activations import apart, load_meta
from offline_pipeline.stages.cache_selection import counted_tokens, split_records, trainable_tokens, usable_positions
from offline_pipeline.stages.hooks import hook_name
from offline_pipeline.stages.sae_config import train_config
from sae_engine.models import resolve_device


def sweep_data(
    cache: ActivationCache, trainable: np.ndarray, counted: np.ndarray, seed: int, normaliser_tokens: int = 50_000
) -> SweepData:
    """Training positions (trainable tokens) and the measured ones (content tokens, as the app counts them)."""
    train_records = split_records(cache, ("train",))
    train = usable_positions(cache, train_records, trainable)
    content = usable_positions(cache, train_records, counted)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(content, size=min(len(content), normaliser_tokens), replace=False))
    held_out = usable_positions(cache, split_records(cache, ("explain",), pairs=False), counted)
    # The refusal filter's openings carry their prompt's domain but are the model's words, not the user's:
    # a domain's FVU and L0 are measured on its prompts' records only.
    separate = apart(cache.records)
    prompts = [i for i in split_records(cache, ("filter", "explain"), pairs=False) if not separate[i]]
    domain_tokens = {
        domain: usable_positions(cache, [i for i in prompts if cache.records[i]["domain"] == domain], counted)
        for domain in SAFETY_DOMAINS
    }
    halves: dict[str, dict[str, int]] = defaultdict(dict)
    for i, r in enumerate(cache.records):
        if r["pair_id"] and r["language"] == "en" and r["kind"] == "prompt" and r["split"] in ("filter", "explain"):
            halves[r["pair_id"]]["twin" if r["is_lookalike"] else "query"] = i
    pairs: dict[str, PairSet] = {}
    for pair_id in sorted(halves):
        h = halves[pair_id]
        if "query" in h and "twin" in h:
            domain = cache.records[h["query"]]["domain"]
            pairs.setdefault(domain, PairSet([], []))
            pairs[domain].queries.append(h["query"])
            pairs[domain].twins.append(h["twin"])
    return SweepData(train, sample, held_out, domain_tokens, pairs)


def run_sweep(ctx: StageContext) -> dict:
    preset, sweep = ctx.preset, ctx.preset.sweep
    cache = ActivationCache.open(ctx.input("activations"))
    meta = load_meta(ctx)
    rows: list[dict] = []
    device = resolve_device(preset.device)
    for layer in sweep.layers:
        for kind in sweep.hook_kinds:
            hook = hook_name(layer, kind)
            counted = counted_tokens(cache, meta, hook)
            data = sweep_data(cache, trainable_tokens(cache, meta, hook), counted, preset.train.seed)
            for k in sweep.ks:
                trained = train_from_cache(
                    cache, hook, data.train, train_config(preset, k), sweep.train_tokens, meta["model_name"], meta["context_size"], device
                )
                sae = trained.sae.to(device)
                metrics = evaluate_config(
                    sae, cache, hook, counted, data, sweep.thresholds, sweep.probe_k, preset.stats.quantile, sae_precision(preset)
                )
                rows += [{"hook_kind": kind, "k": k, "layer": layer, **row} for row in metrics]
    write_json_atomic(ctx.out / "sweep.json", rows)
    return {"configs": len(sweep.layers) * len(sweep.hook_kinds) * len(sweep.ks), "rows": len(rows)}
