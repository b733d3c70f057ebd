"""The stage list: each stage's name, inputs, the slice of the preset its folder key hashes, and its function.

The names, inputs and configuration slices decide the stage folders (see `offline_pipeline.runner`): changing
one moves that stage and every stage after it to new folders.
"""

from __future__ import annotations

from dataclasses import asdict

from offline_pipeline.presets import Preset
from offline_pipeline.runner import Stage, stable_hash
from offline_pipeline.stages.activations import run_activations
from offline_pipeline.stages.choose import run_choose
from offline_pipeline.stages.corpus import run_corpus
from offline_pipeline.stages.database import run_database
from offline_pipeline.stages.evaluate import run_evaluate
from offline_pipeline.stages.explain import run_explain
from offline_pipeline.stages.filter import run_filter
from offline_pipeline.stages.flip import run_flip
from offline_pipeline.stages.hooks import collected_hooks
from offline_pipeline.stages.map import run_map
from offline_pipeline.stages.monitor import run_monitor
from offline_pipeline.stages.refusal import run_refusal
from offline_pipeline.stages.stats import run_stats
from offline_pipeline.stages.sweep import run_sweep
from offline_pipeline.stages.train import run_train


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
    sweep = [Stage("sweep", ("activations",), lambda p: {"sweep": asdict(p.sweep), "sae": _sae_fields(p), "quantile": p.stats.quantile}, run_sweep,
                   version=3)]  # 2: outlier limit from the records not run apart; 3: domain rows without openings
    choose_inputs = ("sweep",) if preset.sweep else ()
    stages = [
        Stage("corpus", (), lambda p: {"corpus": asdict(p.corpus), "model": p.model}, run_corpus, version=2),  # 2: opening records
        Stage(
            "activations",
            ("corpus",),
            lambda p: {"model": p.model, "dtype": p.dtype, "device": p.device, "hooks": collected_hooks(p), "batch": p.collect_batch_tokens},
            run_activations,
            version=2,  # 2: records marked apart run in batches of their own
        ),
        *(sweep if preset.sweep else []),
        Stage("choose", choose_inputs, lambda p: {"sweep": asdict(p.sweep) if p.sweep else None, "pinned": p.pinned}, run_choose),
        Stage("train", ("activations", "choose"), _train_fields, run_train, version=2),  # 2: outlier limit from the records not run apart
        Stage("stats", ("activations", "choose", "train"), lambda p: {"stats": asdict(p.stats), "seed": p.train.seed}, run_stats,
              version=2),  # 2: opening records encoded apart
        Stage("filter", ("activations", "stats"), lambda p: {"filter": asdict(p.filter), "languages": p.filter_languages}, run_filter),
        Stage(
            "explain",
            ("activations", "choose", "train", "stats", "filter"),
            lambda p: {"explain": asdict(p.explain), "seed": p.train.seed, "llm": _llm_identity(settings)},
            run_explain,
        ),
        Stage("map", ("choose", "train", "filter"), lambda p: asdict(p.map), run_map),
        Stage("evaluate", ("activations", "stats", "filter", "explain"), lambda p: {"min_score": p.explain.min_score, "tau": p.filter.tau}, run_evaluate),
        Stage("monitor", ("activations", "choose", "stats"), lambda p: {"monitor": asdict(p.monitor), "layers": p.layers}, run_monitor),
        Stage("refusal", ("activations", "choose"), lambda p: {"layers": p.layers}, run_refusal),
        Stage("flip", ("activations", "choose", "train", "stats"), lambda p: {"flip": asdict(p.flip), "model": p.model}, run_flip),
        Stage(
            "database",
            ("corpus", "activations", "choose", "train", "stats", "filter", "explain", "map", "evaluate", "monitor", "refusal", "flip",
             *choose_inputs),
            # Hashed: a PostgreSQL URL may carry a password, and stage configs are written to DONE.json.
            lambda p: {"url": stable_hash(settings.resolved_database_url)},
            run_database,
            reusable=False,
        ),
    ]
    return stages
