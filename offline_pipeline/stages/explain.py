"""Stage `explain`: examples, explanations and simulation scores of the candidate features."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import asdict

from tqdm.auto import tqdm

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.activations import load_meta
from offline_pipeline.stages.cache_selection import counted_tokens, split_records
from offline_pipeline.stages.filter import load_passes
from offline_pipeline.stages.jsonl import write_jsonl
from offline_pipeline.stages.model import load_preset_model
from offline_pipeline.stages.stats import load_stats
from offline_pipeline.stages.train import load_saes


def run_explain(ctx: StageContext) -> dict:
    from offline_pipeline.explain.runner import (
        ScoringJob,
        explain_features,
        score_features,
    )
    from offline_pipeline.feature_examples import ExampleBuilder

    preset = ctx.preset
    cache = ActivationCache.open(ctx.input("activations"))
    meta = load_meta(ctx)
    loaded = load_preset_model(preset, ctx.settings)
    passes = load_passes(ctx.input("filter"))
    builder = ExampleBuilder(cache, loaded.tokenizer, preset, split_records(cache, ("train", "explain")))
    examples = []
    for layer, (hook, sae) in tqdm(load_saes(ctx).items(), desc="feature examples", unit="layer"):
        stats = load_stats(ctx.input("stats"), layer)
        features = sorted({p.feature for p in passes[layer]})
        examples += builder.build(layer, hook, sae, counted_tokens(cache, meta, hook), stats, features, passes[layer])

    async def work():
        async with explainer_and_simulator(ctx.settings, builder.corpus_counts()) as (explainer, simulator, labels):
            explained = await explain_features(explainer, examples, preset.explain.n_per_side)
            by_id = {e.feature_id: e for e in examples}
            jobs = [ScoringJob(x, by_id[x.feature_id]) for x in explained.results]
            scored = await score_features(simulator, jobs, preset.explain.methods, n_per_side=preset.explain.n_per_side)
            return explained, scored, labels

    explained, scored, labels = asyncio.run(work())
    write_jsonl(ctx.out / "examples.jsonl", [e.to_dict() for e in examples])
    write_jsonl(ctx.out / "explanations.jsonl", [asdict(x) for x in explained.results])
    write_jsonl(ctx.out / "scores.jsonl", [asdict(s) for scores in scored.results for s in scores])
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
