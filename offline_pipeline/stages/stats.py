"""Stage `stats`: per-feature statistics over the corpus, record maxima on the queries, output tokens.

Everything is measured on content tokens (`cache_selection.counted_tokens`), as the app counts them; the
queries' maxima on their template tokens are kept too (`template_max`), so the filter can reject a feature
that fires on the chat template.
"""

from __future__ import annotations

import shutil
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offline_pipeline.activation_cache import ActivationCache, iter_chunks, phases
from offline_pipeline.encoding import encode, encode_records, sae_precision
from offline_pipeline.feature_stats import (
    QUANTILE_POINTS,
    ActivationStats,
    LevelReservoir,
    output_tokens,
    record_maxima,
)
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.activations import apart, load_meta
from offline_pipeline.stages.cache_selection import counted_tokens, split_records, template_tokens
from offline_pipeline.stages.model import load_preset_model
from offline_pipeline.stages.train import load_saes
from sae_engine.models import LoadedModel, resolve_dtype


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
    precision = sae_precision(preset)
    # Every record a later stage measures: the held-out splits, and the training split's prompts (the filter's).
    queries = [i for i, r in enumerate(cache.records) if r["split"] != "train" or r["kind"] == "prompt"]
    record_of_token = torch.from_numpy(cache.record_of_token())
    summary = {}
    # One encoding pass over the pool and the queries together (they overlap: explain records, train prompts).
    records = sorted(set(pool) | set(queries))
    # The refusal filter's openings are encoded in chunks of their own, as the activations stage runs them: mixed
    # into a chunk, they would change the rounding of its products, and so the other records' statistics.
    groups = phases(records, apart(cache.records))
    in_pool = np.isin(cache.record_of_token(), np.asarray(pool))
    row_of = np.full(len(cache.records), -1, dtype=np.int64)
    row_of[np.asarray(queries, dtype=np.int64)] = np.arange(len(queries))
    prefixes = cache.prefix_groups()
    for layer, (hook, sae) in load_saes(ctx).items():
        counted = counted_tokens(cache, meta, hook)
        template = template_tokens(cache, meta, hook)
        stats = ActivationStats(sae.d_sae)
        query_max = np.zeros((len(queries), sae.d_sae), dtype=np.float32)
        template_max = np.zeros((len(queries), sae.d_sae), dtype=np.float32)
        spill = ctx.out / f"triples-{layer}"
        spill.mkdir()
        # A shared chat prefix (template and system prompt, a third of the tokens) holds one copy of its
        # activations: its template maxima are encoded once and given to every query that opens with it.
        shared = shared_prefix_template_max(sae, cache, hook, template, prefixes, row_of, template_max, precision)
        # Pass 1: counts, extremes and histograms over the pool's content tokens, record-level maxima spilled to
        # disk (bounded memory), and every query's maxima on its content and on its template tokens.
        positions = cache.token_span(records)
        bar = tqdm(total=int((~shared[positions]).sum()), unit="tok", unit_scale=True, desc=f"stats layer {layer}")
        everything = np.ones(len(cache.tokens), dtype=bool)
        chunks = chain(*(encode_records(sae, cache, hook, group, everything, skip=shared, dtype=precision) for group in groups))
        for n, (_, part, indices, values) in enumerate(chunks):
            content = values * torch.from_numpy(counted[part])[:, None]
            pooled = torch.from_numpy(in_pool[part] & counted[part])
            stats.add(indices[pooled].numpy(), values[pooled].numpy())
            record, feature, value = record_maxima(indices[pooled], content[pooled], record_of_token[part][pooled])
            np.savez(spill / f"{n:06d}.npz", record=record, feature=feature, value=value)
            rows = torch.from_numpy(row_of[record_of_token[part].numpy()])
            asked = rows >= 0
            flat = (rows[asked, None] * sae.d_sae + indices[asked]).reshape(-1)
            for matrix, kept in ((query_max, content), (template_max, values * torch.from_numpy(template[part])[:, None])):
                torch.from_numpy(matrix).view(-1).scatter_reduce_(0, flat, kept[asked].reshape(-1), "amax", include_self=True)
            bar.update(len(part))
        bar.close()
        # Pass 2: the per-level reservoirs need each feature's max, known only now.
        reservoir = LevelReservoir(stats.max, preset.stats.examples_per_level, seed=preset.train.seed)
        for path in sorted(spill.iterdir()):
            with np.load(path) as triples:
                reservoir.add(triples["record"], triples["feature"], triples["value"])
        shutil.rmtree(spill)
        top_ids, top_vals, bottom_ids, bottom_vals = output_tokens(
            sae.W_dec.detach(), unembed, norm, resolve_dtype(preset.dtype, sae.W_dec.device), preset.stats.n_output_tokens
        )
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
            template_max=template_max.astype(np.float16),
            top_ids=top_ids,
            top_vals=top_vals,
            top_tokens=_token_strings(loaded.tokenizer, top_ids),
            bottom_vals=bottom_vals,
            bottom_tokens=_token_strings(loaded.tokenizer, bottom_ids),
        )
        live = stats.live
        summary[str(layer)] = {"live": int(live.sum()), "dead": int((~live).sum()), "tokens": stats.n_tokens}
    return summary


def shared_prefix_template_max(
    sae, cache: ActivationCache, hook: str, template: np.ndarray, prefixes: list[tuple[int, list[int]]],
    row_of: np.ndarray, template_max: np.ndarray, dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Fold each shared prefix's template maxima into the rows of the queries that open with it, encoding the
    prefix once; returns the token mask of every shared prefix (what the main pass need not encode)."""
    shared = np.zeros(len(cache.tokens), dtype=bool)
    for length, members in prefixes:
        starts = cache.offsets[np.asarray(members)]
        shared[(starts[:, None] + np.arange(length)).reshape(-1)] = True
        span = np.arange(starts[0], starts[0] + length)
        maxima = np.zeros(sae.d_sae, dtype=np.float32)
        for part, x in iter_chunks(cache, hook, span, len(span)):
            indices, values = encode(sae, x, dtype)
            kept = values * torch.from_numpy(template[part])[:, None]
            torch.from_numpy(maxima).scatter_reduce_(0, indices.reshape(-1), kept.reshape(-1), "amax", include_self=True)
        rows = row_of[np.asarray(members)]
        rows = rows[rows >= 0]
        template_max[rows] = np.maximum(template_max[rows], maxima)
    return shared


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


def normalised_queries(stats: dict[str, np.ndarray], key: str = "query_max") -> np.ndarray:
    """Query maxima (`query_max` on content tokens, `template_max` on template tokens) in normalised units."""
    normaliser = stats["normaliser"]
    safe = np.where(np.isfinite(normaliser) & (normaliser > 0), normaliser, np.inf)
    return stats[key].astype(np.float32) / safe
