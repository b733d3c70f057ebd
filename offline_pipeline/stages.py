"""The pipeline's stages, in order:

corpus -> activations -> sweep -> choose -> train -> stats -> filter -> explain -> map -> evaluate -> database

Each stage reads its inputs' folders and writes only into its own (see `offline_pipeline.runner`).
The model runs once over the corpus (`activations`); every later stage works from that cache.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter, defaultdict
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offline_pipeline.activation_cache import ActivationCache, collect, tokenize_records
from offline_pipeline.cache_training import train_from_cache
from offline_pipeline.candidate_filter import (
    FilterPass,
    QueryLabel,
    joint_filter,
    score_gate,
)
from offline_pipeline.config_sweep import (
    PairSet,
    SweepData,
    choose,
    evaluate_config,
    ranking_table,
)
from offline_pipeline.corpus.records import SAFETY_DOMAINS, Record
from offline_pipeline.encoding import encode_records, record_max_matrix
from offline_pipeline.evaluation import detection, domain_scores, language_gap
from offline_pipeline.feature_map import decoder_map
from offline_pipeline.feature_stats import (
    QUANTILE_POINTS,
    ActivationStats,
    LevelReservoir,
    output_tokens,
    record_maxima,
)
from offline_pipeline.presets import TINY_MODEL, Preset
from offline_pipeline.runner import Stage, StageContext, stable_hash, write_json_atomic
from sae_engine.checkpoints import load_saelens, save_saelens
from sae_engine.models import (
    LoadedModel,
    embedded_model_dir,
    load_model,
    resolve_device,
)
from sae_engine.tokens import special_ids
from sae_engine.training import SAETrainConfig

OUTLIER_FACTOR = SAETrainConfig().outlier_factor


# ---------------------------------------------------------------- models


def tiny_model_dir(data_dir: Path) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved once (the `tiny` preset's model)."""
    from transformers import AutoTokenizer

    from sae_engine.models import from_config, tiny_llama_config

    target = Path(data_dir) / "models" / TINY_MODEL
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(Path(data_dir)))
    model = from_config(tiny_llama_config(tokenizer), seed=0).float()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def load_preset_model(preset: Preset, settings) -> LoadedModel:
    if preset.model == TINY_MODEL:
        tiny_model_dir(settings.data_dir)
    return load_model(preset.model, data_dir=settings.data_dir, device=preset.device, dtype=preset.dtype)


def hook_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.hook_{kind}"


def collected_hooks(preset: Preset) -> list[str]:
    """Every hook point a later stage may read: the final layers under each candidate kind, and the sweep's."""
    hooks = {hook_name(layer, kind) for layer in preset.layers for kind in preset.hook_kinds()}
    if preset.sweep:
        hooks |= {hook_name(layer, kind) for layer in preset.sweep.layers for kind in preset.sweep.hook_kinds}
    return sorted(hooks)


# ---------------------------------------------------------------- corpus


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


# ---------------------------------------------------------------- activations


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


def _meta(ctx: StageContext) -> dict:
    return json.loads((ctx.input("activations") / "meta.json").read_text())


def _usable(cache: ActivationCache, meta: dict, hook: str) -> np.ndarray:
    return cache.usable(hook, np.asarray(meta["special_ids"]), OUTLIER_FACTOR)


def _positions(cache: ActivationCache, records: list[int], usable: np.ndarray) -> np.ndarray:
    positions = cache.token_span(records)
    return positions[usable[positions]]


def _split_records(cache: ActivationCache, splits: tuple[str, ...], pairs: bool | None = None) -> list[int]:
    return [
        i
        for i, r in enumerate(cache.records)
        if r["split"] in splits and (pairs is None or (r["pair_id"] is not None) == pairs)
    ]


# ---------------------------------------------------------------- sweep and choice


def train_config(preset: Preset, k: int) -> SAETrainConfig:
    t = preset.train
    return SAETrainConfig(
        k=k,
        expansion_factor=t.expansion_factor,
        batch_size=t.batch_size,
        lr=t.lr,
        dead_after_tokens=t.dead_after_tokens,
        seed=t.seed,
    )


def sweep_data(cache: ActivationCache, usable: np.ndarray, seed: int, normaliser_tokens: int = 50_000) -> SweepData:
    train = _positions(cache, _split_records(cache, ("train",)), usable)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(train, size=min(len(train), normaliser_tokens), replace=False))
    held_out = _positions(cache, _split_records(cache, ("explain",), pairs=False), usable)
    domain_tokens = {}
    for domain in SAFETY_DOMAINS:
        records = [i for i in _split_records(cache, ("filter", "explain"), pairs=False) if cache.records[i]["domain"] == domain]
        domain_tokens[domain] = _positions(cache, records, usable)
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
    meta = _meta(ctx)
    rows: list[dict] = []
    device = resolve_device(preset.device)
    for layer in sweep.layers:
        for kind in sweep.hook_kinds:
            hook = hook_name(layer, kind)
            usable = _usable(cache, meta, hook)
            data = sweep_data(cache, usable, preset.train.seed)
            for k in sweep.ks:
                trained = train_from_cache(
                    cache, hook, data.train, train_config(preset, k), sweep.train_tokens, meta["model_name"], meta["context_size"], device
                )
                sae = trained.sae.to(device)
                metrics = evaluate_config(sae, cache, hook, usable, data, sweep.thresholds, sweep.probe_k, preset.stats.quantile)
                rows += [{"hook_kind": kind, "k": k, "layer": layer, **row} for row in metrics]
    write_json_atomic(ctx.out / "sweep.json", rows)
    return {"configs": len(sweep.layers) * len(sweep.hook_kinds) * len(sweep.ks), "rows": len(rows)}


def run_choose(ctx: StageContext) -> dict:
    preset = ctx.preset
    if preset.sweep is None:
        if preset.pinned is None:
            raise ValueError(f"preset {preset.name!r} has neither a sweep nor a pinned configuration")
        result = {"hook_kind": preset.pinned[0], "k": preset.pinned[1], "rule": "Pinned by the preset (no sweep).", "ranking": []}
    else:
        rows = json.loads((ctx.input("sweep") / "sweep.json").read_text())
        choice = choose(rows, preset.sweep.reference_threshold, preset.sweep.max_fvu, preset.pinned)
        print(f"selection rule: {choice.rule}\n{ranking_table(choice)}\nchosen: {choice.hook_kind}, k={choice.k}")
        result = asdict(choice)
    write_json_atomic(ctx.out / "choice.json", result)
    return {"hook_kind": result["hook_kind"], "k": result["k"]}


def _choice(ctx: StageContext) -> dict:
    return json.loads((ctx.input("choose") / "choice.json").read_text())


# ---------------------------------------------------------------- training


def sae_folder(train_dir: Path, hook: str) -> Path:
    return train_dir / "saes" / hook


def run_train(ctx: StageContext) -> dict:
    from sae_engine.metrics import evaluate_saes
    from sae_engine.tokens import pack_texts

    preset = ctx.preset
    choice = _choice(ctx)
    cache = ActivationCache.open(ctx.input("activations"))
    meta = _meta(ctx)
    config = train_config(preset, int(choice["k"]))
    hooks = [hook_name(layer, choice["hook_kind"]) for layer in preset.layers]
    loaded = load_preset_model(preset, ctx.settings)
    saes = {}
    if preset.train.from_cache:
        for hook in hooks:
            usable = _usable(cache, meta, hook)
            positions = _positions(cache, _split_records(cache, ("train",)), usable)
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


def _saes(ctx: StageContext) -> dict[int, tuple[str, object]]:
    """layer -> (hook, TopKSAE) of the trained set."""
    choice = _choice(ctx)
    device = resolve_device(ctx.preset.device)
    out = {}
    for layer in ctx.preset.layers:
        hook = hook_name(layer, choice["hook_kind"])
        out[layer] = (hook, load_saelens(sae_folder(ctx.input("train"), hook), device=str(device)).sae)
    return out


# ---------------------------------------------------------------- feature statistics


def stats_file(folder: Path, layer: int) -> Path:
    return folder / f"layer{layer}.npz"


def run_stats(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    meta = _meta(ctx)
    loaded = load_preset_model(preset, ctx.settings)
    unembed = loaded.model.get_output_embeddings().weight.detach().float().cpu()
    norm = _final_norm_weight(loaded)
    pool = _split_records(cache, ("train", "explain"))
    queries = [i for i, r in enumerate(cache.records) if r["split"] != "train"]
    record_of_token = torch.from_numpy(cache.record_of_token())
    summary = {}
    for layer, (hook, sae) in _saes(ctx).items():
        usable = _usable(cache, meta, hook)
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


# ---------------------------------------------------------------- filter


def run_filter(ctx: StageContext) -> dict:
    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    result: dict[str, list[dict]] = {}
    for layer in preset.layers:
        stats = load_stats(ctx.input("stats"), layer)
        rows = [row for row, record in enumerate(stats["query_records"]) if _filter_query(cache.records[record], preset)]
        labels = []
        for row in rows:
            r = cache.records[stats["query_records"][row]]
            safety = r["domain"] in SAFETY_DOMAINS
            labels.append(QueryLabel(r["domain"] if safety else None, r["concept"] if safety else None, r["domain"] == "benign"))
        passes = joint_filter(normalised_queries(stats)[rows], labels, preset.filter)
        result[str(layer)] = [asdict(p) for p in passes]
    write_json_atomic(ctx.out / "passes.json", result)
    per_layer = {layer: len({p["feature"] for p in passes}) for layer, passes in result.items()}
    domains = Counter(p["domain"] for passes in result.values() for p in passes if p["concept"] is None)
    return {"candidates_per_layer": per_layer, "domain_passes": dict(domains), "labelled_queries": len(rows)}


def _filter_query(record: dict, preset: Preset) -> bool:
    """The filter's labelled queries: the `filter` split, and the contrastive pairs outside the `score` split."""
    if record["kind"] == "chat" or record["language"] not in preset.filter_languages:
        return False
    if record["pair_id"] is not None:
        return record["split"] in ("filter", "explain")
    return record["split"] == "filter"


def load_passes(folder: Path) -> dict[int, list[FilterPass]]:
    raw = json.loads((folder / "passes.json").read_text())
    return {int(layer): [FilterPass(**p) for p in passes] for layer, passes in raw.items()}


# ---------------------------------------------------------------- explain and score


def run_explain(ctx: StageContext) -> dict:
    from offline_pipeline.explain.runner import (
        ScoringJob,
        explain_features,
        score_features,
    )
    from offline_pipeline.feature_examples import ExampleBuilder

    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    meta = _meta(ctx)
    loaded = load_preset_model(preset, ctx.settings)
    passes = load_passes(ctx.input("filter"))
    builder = ExampleBuilder(cache, loaded.tokenizer, preset, _split_records(cache, ("train", "explain")))
    examples = []
    for layer, (hook, sae) in tqdm(_saes(ctx).items(), desc="feature examples", unit="layer"):
        stats = load_stats(ctx.input("stats"), layer)
        features = sorted({p.feature for p in passes[layer]})
        usable = _usable(cache, meta, hook)
        examples += builder.build(layer, hook, sae, usable, stats, features, passes[layer])

    async def work():
        async with explainer_and_simulator(ctx.settings, builder.corpus_counts()) as (explainer, simulator, labels):
            explained = await explain_features(explainer, examples, preset.explain.n_per_side)
            by_id = {e.feature_id: e for e in examples}
            jobs = [ScoringJob(x, by_id[x.feature_id]) for x in explained.results]
            scored = await score_features(simulator, jobs, preset.explain.methods, n_per_side=preset.explain.n_per_side)
            return explained, scored, labels

    explained, scored, labels = asyncio.run(work())
    _write_jsonl(ctx.out / "examples.jsonl", [e.to_dict() for e in examples])
    _write_jsonl(ctx.out / "explanations.jsonl", [asdict(x) for x in explained.results])
    _write_jsonl(ctx.out / "scores.jsonl", [asdict(s) for scores in scored.results for s in scores])
    failures = {"explain": explained.failures, "score": scored.failures}
    write_json_atomic(ctx.out / "failures.json", failures)
    return {
        "features": len(examples),
        "explained": len(explained.results),
        "scored": len(scored.results),
        "explain_failures": len(explained.failures),
        "score_failures": len(scored.failures),
        **labels,
    }


@asynccontextmanager
async def explainer_and_simulator(settings, corpus_counts: dict[str, int]):
    """(explainer, simulator, labels): the LLM pair when an endpoint is configured, else the offline pair.

    The labels name what ran (offline results say so); for an LLM, they gain the recorded token usage
    when the block ends.
    """
    from offline_pipeline.explain.llm_client import CostLedger, LLMClient, LLMConfig
    from offline_pipeline.explain.llm_explainer import LLMExplainer
    from offline_pipeline.explain.simulation import LexicalSimulator, LLMSimulator
    from offline_pipeline.explain.statistical_explainer import (
        EXPLAINER,
        StatisticalExplainer,
    )

    config = LLMConfig.from_settings(settings)
    if config is None:
        simulator = LexicalSimulator()
        yield StatisticalExplainer(corpus_counts), simulator, {"explainer": EXPLAINER, "simulator": simulator.name}
        return
    ledger = CostLedger()
    client = LLMClient(config, ledger)
    await client.start()
    try:
        simulator = LLMSimulator(client)
        labels = {"explainer": f"llm:{client.model}", "simulator": simulator.name}
        yield LLMExplainer(client), simulator, labels
        labels["usage"] = ledger.summary()
    finally:
        await client.close()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def gate_scores(explain_dir: Path, method: str) -> dict[str, float | None]:
    """feature id -> the score of `method` that decides tagging (the first method of the preset)."""
    return {s["feature_id"]: s["value"] for s in read_jsonl(explain_dir / "scores.jsonl") if s["method"] == method}


def safety_tags(ctx: StageContext) -> dict[str, list[str]]:
    """feature id -> domains, for the candidates that pass the score gate."""
    passes = load_passes(ctx.input("filter"))
    candidates = {f"{layer}_{p.feature}": set() for layer, ps in passes.items() for p in ps}
    for layer, ps in passes.items():
        for p in ps:
            candidates[f"{layer}_{p.feature}"].add(p.domain)
    scores = gate_scores(ctx.input("explain"), ctx.preset.explain.methods[0])
    kept = score_gate(sorted(candidates), scores, ctx.preset.explain.min_score)
    return {feature_id: sorted(candidates[feature_id]) for feature_id in kept}


# ---------------------------------------------------------------- map


def run_map(ctx: StageContext) -> dict:
    preset = ctx.preset
    passes = load_passes(ctx.input("filter"))
    ids, directions = [], []
    for layer, (_, sae) in _saes(ctx).items():
        for feature in sorted({p.feature for p in passes[layer]}):
            ids.append(f"{layer}_{feature}")
            directions.append(sae.W_dec[feature].detach().float().cpu().numpy())
    coords = decoder_map(np.array(directions), preset.map) if len(ids) >= 3 else np.zeros((0, 2))
    if len(ids) and len(coords) != len(ids):
        raise ValueError(f"the map needs at least 3 candidate features, the filter found {len(ids)}")
    result = {"description": preset.map.description, "coords": {fid: [float(x), float(y)] for fid, (x, y) in zip(ids, coords)}}
    write_json_atomic(ctx.out / "map.json", result)
    return {"features": len(ids), "description": preset.map.description}


# ---------------------------------------------------------------- evaluate


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
    return {d: r["auroc_vs_benign"] for d, r in result["detection"].items()}


# ---------------------------------------------------------------- database


def run_database(ctx: StageContext) -> dict:
    from offline_pipeline.db_writer import RunFolders, write_run

    folders = RunFolders(**{name: ctx.input(name) for name in RunFolders.__dataclass_fields__})
    counts = write_run(ctx.settings.resolved_database_url, ctx.preset, ctx.run_dir, folders, safety_tags(ctx))
    return counts


# ---------------------------------------------------------------- the stage list


def _llm_identity(settings) -> dict:
    return {"base_url": settings.llm_base_url, "model": settings.llm_model}


def _sae_fields(p: Preset) -> dict:
    """The training settings an SAE depends on (not how many tokens, nor where they come from)."""
    t = p.train
    return {"expansion": t.expansion_factor, "batch": t.batch_size, "lr": t.lr, "dead_after": t.dead_after_tokens, "seed": t.seed}


def _train_fields(p: Preset) -> dict:
    t = p.train
    source = {"from_cache": True} if t.from_cache else {"from_cache": False, "stream_batch_rows": t.stream_batch_rows}
    return {"sae": _sae_fields(p), "tokens": t.train_tokens, "eval_rows": t.eval_rows, "layers": p.layers, **source}


def stages_for(preset: Preset, settings) -> list[Stage]:
    sweep = [Stage("sweep", ("activations",), lambda p: {"sweep": asdict(p.sweep), "sae": _sae_fields(p), "quantile": p.stats.quantile}, run_sweep)]
    choose_inputs = ("sweep",) if preset.sweep else ()
    stages = [
        Stage("corpus", (), lambda p: {"corpus": asdict(p.corpus), "model": p.model if p.corpus.chat_prompts else None}, run_corpus),
        Stage(
            "activations",
            ("corpus",),
            lambda p: {"model": p.model, "dtype": p.dtype, "device": p.device, "hooks": collected_hooks(p), "batch": p.collect_batch_tokens},
            run_activations,
        ),
        *(sweep if preset.sweep else []),
        Stage("choose", choose_inputs, lambda p: {"sweep": asdict(p.sweep) if p.sweep else None, "pinned": p.pinned}, run_choose),
        Stage("train", ("activations", "choose"), _train_fields, run_train),
        Stage("stats", ("activations", "choose", "train"), lambda p: {"stats": asdict(p.stats), "seed": p.train.seed}, run_stats),
        Stage("filter", ("activations", "stats"), lambda p: {"filter": asdict(p.filter), "languages": p.filter_languages}, run_filter),
        Stage(
            "explain",
            ("activations", "choose", "train", "stats", "filter"),
            lambda p: {"explain": asdict(p.explain), "seed": p.train.seed, "llm": _llm_identity(settings)},
            run_explain,
        ),
        Stage("map", ("choose", "train", "filter"), lambda p: asdict(p.map), run_map),
        Stage("evaluate", ("activations", "stats", "filter", "explain"), lambda p: {"min_score": p.explain.min_score, "tau": p.filter.tau}, run_evaluate),
        Stage(
            "database",
            ("corpus", "activations", "choose", "train", "stats", "filter", "explain", "map", "evaluate", *choose_inputs),
            # Hashed: a PostgreSQL URL may carry a password, and stage configs are written to DONE.json.
            lambda p: {"url": stable_hash(settings.resolved_database_url)},
            run_database,
        ),
    ]
    return stages
