"""Stage `stats`: per-feature statistics over the corpus, record maxima on the queries, output tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.encoding import encode_records, record_max_matrix
from offline_pipeline.feature_stats import (
    QUANTILE_POINTS,
    ActivationStats,
    LevelReservoir,
    output_tokens,
    record_maxima,
)
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.activations import load_meta
from offline_pipeline.stages.cache_selection import split_records, usable_tokens
from offline_pipeline.stages.model import load_preset_model
from offline_pipeline.stages.train import load_saes
from sae_engine.models import LoadedModel


def stats_file(folder: Path, layer: int) -> Path:
    return folder / f"layer{layer}.npz"


def run_stats(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    meta = load_meta(ctx)
    loaded = load_preset_model(preset, ctx.settings)
    unembed = loaded.model.get_output_embeddings().weight.detach().float().cpu()
    norm = _final_norm_weight(loaded)
    pool = split_records(cache, ("train", "explain"))
    queries = [i for i, r in enumerate(cache.records) if r["split"] != "train"]
    record_of_token = torch.from_numpy(cache.record_of_token())
    summary = {}
    for layer, (hook, sae) in load_saes(ctx).items():
        usable = usable_tokens(cache, meta, hook)
        stats = ActivationStats(sae.d_sae)
        spill = ctx.out / f"triples-{layer}"
        spill.mkdir()
        # Pass 1: counts, extremes and histograms; record-level maxima spilled to disk (bounded memory).
        bar = tqdm(total=len(cache.token_span(pool)), unit="tok", unit_scale=True, desc=f"stats layer {layer}")
        for n, (_, part, indices, values) in enumerate(encode_records(sae, cache, hook, pool, usable)):
            keep = torch.from_numpy(usable[part])
            stats.add(indices[keep].numpy(), values[keep].numpy())
            record, feature, value = record_maxima(indices, values, record_of_token[part])
            np.savez(spill / f"{n:06d}.npz", record=record, feature=feature, value=value)
            bar.update(len(part))
        bar.close()
        # Pass 2: the per-level reservoirs need each feature's max, known only now.
        reservoir = LevelReservoir(stats.max, preset.stats.examples_per_level, seed=preset.train.seed)
        for path in sorted(spill.iterdir()):
            with np.load(path) as triples:
                reservoir.add(triples["record"], triples["feature"], triples["value"])
        shutil.rmtree(spill)
        query_max = record_max_matrix(sae, cache, hook, queries, usable)
        top_ids, top_vals, bottom_ids, bottom_vals = output_tokens(sae.W_dec.detach(), unembed, norm, preset.stats.n_output_tokens)
        histogram_counts = np.array([stats.linear_histogram(f)["counts"] for f in range(sae.d_sae)], dtype=np.int64)
        np.savez(
            stats_file(ctx.out, layer),
            n_tokens=stats.n_tokens,
            density=stats.density,
            max=stats.max,
            normaliser=stats.normaliser(preset.stats.quantile),
            quantile_points=np.array(QUANTILE_POINTS),
            quantiles=np.stack([stats.quantile(q) for q in QUANTILE_POINTS]),
            histogram_counts=histogram_counts,
            reservoir_record=reservoir.record.reshape(sae.d_sae, reservoir.n_levels, -1),
            reservoir_value=reservoir.value.reshape(sae.d_sae, reservoir.n_levels, -1),
            query_records=np.asarray(queries, dtype=np.int64),
            query_max=query_max.astype(np.float16),
            top_ids=top_ids,
            top_vals=top_vals,
            top_tokens=_token_strings(loaded.tokenizer, top_ids),
            bottom_vals=bottom_vals,
            bottom_tokens=_token_strings(loaded.tokenizer, bottom_ids),
        )
        live = stats.live
        summary[str(layer)] = {"live": int(live.sum()), "dead": int((~live).sum()), "tokens": stats.n_tokens}
    return summary


def _token_strings(tokenizer, ids: np.ndarray) -> np.ndarray:
    vocabulary = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return np.vectorize(vocabulary.__getitem__, otypes=[str])(ids)


def _final_norm_weight(loaded: LoadedModel) -> torch.Tensor | None:
    base = getattr(loaded.model, "model", None)
    norm = getattr(base, "norm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach().float().cpu()
    # Gemma's RMSNorm scales by (1 + weight).
    return weight + 1 if loaded.model.config.model_type.startswith("gemma") else weight


def load_stats(folder: Path, layer: int) -> dict[str, np.ndarray]:
    with np.load(stats_file(folder, layer)) as data:
        return {key: data[key] for key in data.files}


def normalised_queries(stats: dict[str, np.ndarray]) -> np.ndarray:
    normaliser = stats["normaliser"]
    safe = np.where(np.isfinite(normaliser) & (normaliser > 0), normaliser, np.inf)
    return stats["query_max"].astype(np.float32) / safe
