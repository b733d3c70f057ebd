"""The stage runner, and the whole pipeline on the `tiny` preset: re-written, re-seeded, on PostgreSQL, and the app's
trace against the pipeline's statistics (killed and resumed runs: tests/test_crash_safety.py)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_support import REPO, RESULT_TABLES, TinyRun, dump, run_tiny
from postgres import postgres_server  # noqa: F401
from sqlalchemy import create_engine, text

from offline_pipeline.runner import (
    DONE,
    PipelineError,
    Stage,
    run_lock,
    run_stages,
    stage_folders,
    status,
)

# ---------------------------------------------------------------- the runner on toy stages


@dataclass(frozen=True)
class ToyPreset:
    a: int = 1
    b: int = 2

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b}


def _toy_stages(calls: list[str], fail_in: str | None = None) -> list[Stage]:
    def make(name: str, inputs: tuple[str, ...]):
        def run(ctx) -> dict:
            calls.append(name)
            (ctx.out / "partial.txt").write_text("started")
            if name == fail_in:
                raise RuntimeError(f"{name} crashed")
            total = sum(json.loads((ctx.input(i) / "value.json").read_text()) for i in inputs)
            (ctx.out / "value.json").write_text(json.dumps(total + getattr(ctx.preset, name, 10)))
            return {"value": total}

        return run

    return [
        Stage("a", (), lambda p: p.a, make("a", ())),
        Stage("b", ("a",), lambda p: p.b, make("b", ("a",))),
        Stage("c", ("b",), lambda p: None, make("c", ("b",))),
    ]


def test_runner_skips_done_stages_and_redoes_a_crashed_one(tmp_path: Path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="b crashed"):
        run_stages(_toy_stages(calls, fail_in="b"), ToyPreset(), None, tmp_path, log=lambda _: None)
    folders = stage_folders(_toy_stages([]), ToyPreset(), tmp_path)
    assert (folders["a"] / DONE).is_file() and not (folders["b"] / DONE).is_file()
    assert (folders["b"] / "partial.txt").is_file()  # what the crash left behind
    calls.clear()
    run_stages(_toy_stages(calls), ToyPreset(), None, tmp_path, log=lambda _: None)
    assert calls == ["b", "c"]  # a was done; b restarted from an empty folder
    assert json.loads((folders["c"] / "value.json").read_text()) == 1 + 2 + 10
    assert [s.done for s in status(_toy_stages([]), ToyPreset(), tmp_path)] == [True, True, True]
    calls.clear()
    run_stages(_toy_stages(calls), ToyPreset(), None, tmp_path, log=lambda _: None)
    assert calls == []
    run_stages(_toy_stages(calls), ToyPreset(), None, tmp_path, force=["b"], log=lambda _: None)
    assert calls == ["b", "c"]  # forcing a stage re-runs what depends on it


def test_changing_a_stage_config_changes_its_folder_and_those_downstream(tmp_path: Path):
    before = stage_folders(_toy_stages([]), ToyPreset(), tmp_path)
    after = stage_folders(_toy_stages([]), ToyPreset(b=3), tmp_path)
    assert before["a"] == after["a"]
    assert before["b"] != after["b"] and before["c"] != after["c"]
    with pytest.raises(PipelineError, match="unknown stage"):
        run_stages(_toy_stages([]), ToyPreset(), None, tmp_path, force=["nope"], log=lambda _: None)


def test_a_run_links_the_finished_stages_of_another_run_with_the_same_settings(tmp_path: Path):
    calls: list[str] = []
    first, second = tmp_path / "first", tmp_path / "second"
    run_stages(_toy_stages(calls), ToyPreset(), None, first, log=lambda _: None)
    calls.clear()
    logged: list[str] = []
    folders = run_stages(_toy_stages(calls), ToyPreset(b=3), None, second, log=logged.append, reuse=[first])
    assert calls == ["b", "c"]  # a has the same key in both runs: linked; b's setting differs
    assert any(line.startswith("[a] done in") and "linked" in line for line in logged)
    assert os.path.samefile(first / folders["a"].name / "value.json", folders["a"] / "value.json")
    assert json.loads((folders["c"] / "value.json").read_text()) == 1 + 3 + 10
    calls.clear()
    run_stages(_toy_stages(calls), ToyPreset(b=3), None, tmp_path / "third", force=["a"], reuse=[first, second],
               log=lambda _: None)
    assert calls == ["a", "b", "c"]  # forced stages are recomputed even where another run has them


def test_seed_gives_its_own_run_with_the_corpus_and_activations_unchanged(tmp_path: Path, data_dir: Path, smollm2_dir: Path):
    from typer.testing import CliRunner

    from starmap.cli import app

    root = ["--data-dir", str(data_dir)]

    def folders(*extra: str) -> dict[str, str]:
        result = CliRunner().invoke(app, [*root, "pipeline", "status", "--preset", "tiny", *extra])
        assert result.exit_code == 0, result.output
        run = re.search(r"run folder: (\S+)", result.output).group(1)
        return {"run": run, **dict(re.findall(r"^  (\w+) +(?:pending|done +[\d.]+ s) +(\S+)$", result.output, re.M))}

    default, seeded = folders(), folders("--seed", "7")
    assert default == folders("--seed", "0")  # the preset's own seed
    assert seeded["run"] != default["run"] and len(seeded) == len(default) > 10
    assert seeded["corpus"] == default["corpus"] and seeded["activations"] == default["activations"]
    assert seeded["train"] != default["train"] and seeded["explain"] != default["explain"]
    result = CliRunner().invoke(app, [*root, "pipeline", "run", "--preset", "tiny", "--reuse", str(tmp_path / "nope")])
    assert result.exit_code == 2 and f"--reuse: no run folder {tmp_path / 'nope'}" in result.output, result.output


def test_one_process_per_run_folder(tmp_path: Path):
    with run_lock(tmp_path), pytest.raises(PipelineError, match="another process"):
        run_stages(_toy_stages([]), ToyPreset(), None, tmp_path, log=lambda _: None)


# ---------------------------------------------------------------- the tiny pipeline, end to end


def test_rewriting_a_run_replaces_its_rows_exactly(tiny_run: TinyRun, data_dir: Path):
    before = dump(tiny_run.db)
    log = run_tiny(data_dir, tiny_run.run_dir, tiny_run.db, "--force-stage", "database")
    assert "[explain] done, skipped" in log and "[database] running" in log
    assert dump(tiny_run.db) == before


def test_a_seeded_run_links_the_shared_stages_and_adds_a_set_of_its_own(tiny_run: TinyRun, data_dir: Path):
    db = tiny_run.root / "seeded.db"
    shutil.copy(tiny_run.db, db)
    before = dump(db)
    log = run_tiny(data_dir, tiny_run.root / "seed1", db, "--seed", "1", "--reuse", str(tiny_run.run_dir))
    for stage in ("corpus", "activations"):
        assert f"[{stage}] done in {tiny_run.run_dir}, linked" in log
    assert "[train] running" in log and "[database] running" in log
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        names = sorted(connection.execute(text("SELECT name FROM sae_sets")).scalars())
    engine.dispose()
    # The seed can change the sweep's choice, so only the suffix is known.
    assert len(names) == 2 and [name.endswith("-seed1") for name in names].count(True) == 1, names
    after = dump(db)
    for table in ("features", "saes", "explanations"):
        assert set(before[table]) < set(after[table]), f"table {table}: the first set's rows changed or no new rows"


def test_tiny_database_structure(tiny_run: TinyRun):
    engine = create_engine(f"sqlite:///{tiny_run.db}")
    with engine.connect() as c:
        safety = c.execute(
            text("SELECT id, feature_id, normaliser, umap_x, umap_y FROM features WHERE is_safety")
        ).all()
        assert safety, "no safety-tagged feature"
        for pk, feature_id, normaliser, x, y in safety:
            assert normaliser is not None and math.isfinite(normaliser) and normaliser > 0, feature_id
            assert x is not None and y is not None, feature_id
            scores = c.execute(
                text("SELECT s.value FROM scores s JOIN explanations e ON e.id = s.explanation_id WHERE e.feature_id = :f"),
                {"f": pk},
            ).scalars().all()
            assert any(v is not None for v in scores), feature_id
            assert c.execute(text("SELECT count(*) FROM feature_domains WHERE feature_id = :f"), {"f": pk}).scalar() >= 1
            levels = c.execute(text("SELECT DISTINCT level FROM examples WHERE feature_id = :f AND source = 'activating'"), {"f": pk}).scalars().all()
            assert levels and all(0 <= level <= 9 for level in levels)
        live = c.execute(text("SELECT normaliser FROM features")).scalars().all()
        assert all(n is not None and math.isfinite(n) and n > 0 for n in live)
        layers = c.execute(text("SELECT DISTINCT layer FROM features ORDER BY layer")).scalars().all()
        assert layers == [0, 1, 2, 3]
        metrics = c.execute(text("SELECT metrics FROM saes")).scalars().all()
        assert all(0 < json.loads(m)["fvu"] < 1 for m in metrics)
        metric_names = set(c.execute(text("SELECT DISTINCT metric FROM sweep_results")).scalars().all())
        assert metric_names == {"L0_t", "I_CDF", "probe_ksparse", "probe_1d", "fvu", "l0"}
        rule = c.execute(text("SELECT selection_rule FROM pipeline_runs")).scalar()
        assert "L0,t" in rule
    engine.dispose()
    evaluation = json.loads(next(tiny_run.run_dir.glob("evaluate-*/evaluation.json")).read_text())
    assert set(evaluation["detection"]) == {"politics", "pornography", "violence", "terror", "self_harm", "drugs", "hate"}
    assert set(evaluation["language_gap"]) >= {"en", "hi"}


def test_status_command_lists_every_stage(tiny_run: TinyRun, data_dir: Path):
    env = {**os.environ, "STARMAP_DATA_DIR": str(data_dir), "STARMAP_DATABASE_URL": f"sqlite:///{tiny_run.db}"}
    result = subprocess.run(
        [sys.executable, "-m", "starmap.cli", "pipeline", "status", "--preset", "tiny", "--run-dir", str(tiny_run.run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    for stage in ("corpus", "activations", "sweep", "choose", "train", "stats", "filter", "explain", "map", "evaluate", "database"):
        assert f"  {stage}" in result.stdout
    assert "pending" not in result.stdout
    # Another database is another destination: only the database stage is pending there.
    env["STARMAP_DATABASE_URL"] = f"sqlite:///{tiny_run.root / 'other.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "starmap.cli", "pipeline", "status", "--preset", "tiny", "--run-dir", str(tiny_run.run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    assert [line.split()[0] for line in result.stdout.splitlines() if "pending" in line] == ["database"]


# ---------------------------------------------------------------- which explainer runs


def test_offline_explainer_and_simulator_without_an_endpoint():
    import asyncio

    from offline_pipeline.stages.explain import explainer_and_simulator
    from starmap.settings import Settings

    async def scenario():
        async with explainer_and_simulator(Settings(llm_base_url=None), {"bomb": 1}) as (explainer, simulator, labels):
            return type(explainer).__name__, simulator.name, labels

    assert asyncio.run(scenario()) == (
        "StatisticalExplainer",
        "offline-lexical",
        {"explainer": "offline-statistical", "simulator": "offline-lexical"},
    )


def test_llm_explainer_when_an_endpoint_is_configured(tmp_path: Path):
    import asyncio

    from app.loopback_server import serve_on_loopback
    from offline_pipeline.explain.records import ActivationRecord, FeatureExamples
    from offline_pipeline.stages.explain import explainer_and_simulator
    from starmap.settings import Settings
    from tests.scripted_openai_server import ScriptedServer

    server = ScriptedServer(respond=lambda body: "Mentions of explosives.")
    record = ActivationRecord(["How", " to", " build", " a", " bomb"], [0.0, 0.0, 0.0, 0.0, 2.0])
    examples = FeatureExamples("3_7", 2.0, [[] for _ in range(9)] + [[record]])
    with serve_on_loopback(server.app) as url:
        settings = Settings(llm_base_url=url + "/v1", llm_model="scripted-model", data_dir=tmp_path)

        async def scenario():
            async with explainer_and_simulator(settings, {}) as (explainer, simulator, labels):
                explanation = await explainer.explain(examples)
            return explanation, simulator.name, labels

        explanation, simulator_name, labels = asyncio.run(scenario())
    assert explanation.text == "Mentions of explosives." and explanation.explainer == "llm"
    assert explanation.input_tokens > 0 and explanation.output_tokens == 3
    assert simulator_name.startswith("llm:scripted-model")
    assert labels["explainer"] == "llm:scripted-model" and "output_tokens=3" in labels["usage"]


# ---------------------------------------------------------------- the paper's path: pinned config, streamed training


def test_pinned_config_and_streamed_training(data_dir: Path, smollm2_dir: Path, tmp_path: Path):
    from dataclasses import replace

    from offline_pipeline.pipeline import stages_for
    from offline_pipeline.presets import TINY
    from offline_pipeline.stages.train import sae_folder
    from sae_engine.checkpoints import load_saelens
    from starmap.settings import Settings

    preset = replace(
        TINY,
        name="tiny-streamed",
        sweep=None,
        pinned=("mlp_out", 8),
        train=replace(TINY.train, from_cache=False, stream_batch_rows=4, train_tokens=3000),
    )
    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'unused.db'}")
    stages = [s for s in stages_for(preset, settings) if s.name in ("corpus", "activations", "choose", "train")]
    assert [s.name for s in stages] == ["corpus", "activations", "choose", "train"]
    folders = run_stages(stages, preset, settings, tmp_path / "run", log=lambda _: None)
    choice = json.loads((folders["choose"] / "choice.json").read_text())
    assert (choice["hook_kind"], choice["k"]) == ("mlp_out", 8) and "Pinned" in choice["rule"]
    metrics = json.loads((folders["train"] / "metrics.json").read_text())
    for layer in preset.layers:
        hook = f"blocks.{layer}.hook_mlp_out"
        loaded = load_saelens(sae_folder(folders["train"], hook))
        assert loaded.sae.k == 8 and loaded.sae.d_sae == 64 * preset.train.expansion_factor
        # Streamed from the model (BOS and special tokens are not trained on), not from the cache.
        assert 2500 < loaded.metadata["training_tokens"] <= 3100
        assert "distinct_training_tokens" not in loaded.metadata
        assert 0 < metrics[hook]["fvu"] < 1.5 and math.isfinite(metrics[hook]["ce_increase"])


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--run-dir", "a-file", "--run-dir: {tmp}/a-file exists and is not a folder"),
    ("--database-url", "nonsense://x", "--database-url: cannot open nonsense://x (NoSuchModuleError"),
    ("--database-url", "sqlite:///{tmp}/garbage.db", "--database-url: {tmp}/garbage.db: not a usable SQLite database"),
])
def test_run_refuses_a_destination_it_cannot_write_before_any_stage(tmp_path: Path, option, value, message):
    from typer.testing import CliRunner

    from starmap.cli import app

    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "garbage.db").write_text("not a database")
    value = value.format(tmp=tmp_path)
    root = ["--data-dir", str(tmp_path / "data")]
    run = ["pipeline", "run", "--preset", "tiny", "--run-dir", str(tmp_path / "run")]
    if option == "--run-dir":
        run[-1] = str(tmp_path / value)
    else:
        root += [option, value]
    result = CliRunner().invoke(app, root + run)
    assert result.exit_code == 2 and message.format(tmp=tmp_path) in result.output, result.output
    assert "[corpus]" not in result.output
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "garbage.db").read_text() == "not a database"


def test_pipeline_writes_to_postgresql_and_the_server_reads_it(tiny_run: TinyRun, postgres_server, data_dir: Path):  # noqa: F811
    """The finished tiny run written to a real PostgreSQL server equals its SQLite database, and the server runs on it."""
    import httpx

    from app.loopback_server import serve_on_loopback
    from app.main import create_app
    from starmap.settings import Settings

    url = postgres_server.create_database()
    log = run_tiny(data_dir, tiny_run.run_dir, url)
    assert "[explain] done, skipped" in log and "[database] running" in log
    on_postgres, on_sqlite = dump(url, RESULT_TABLES), dump(tiny_run.db, RESULT_TABLES)
    assert on_postgres["features"], "nothing was written to PostgreSQL"
    for table in RESULT_TABLES:
        assert on_postgres[table] == on_sqlite[table], f"table {table} differs between PostgreSQL and SQLite"

    app = create_app(Settings(data_dir=data_dir, database_url=url, model="tiny-llama", device="cpu", dtype="float32"))
    with serve_on_loopback(app) as base, httpx.Client(base_url=base, timeout=120) as http:
        health = http.get("/healthz").json()
        assert health["model"] and health["sets"], health
        engine = create_engine(f"sqlite:///{tiny_run.db}")
        with engine.connect() as connection:
            on_map = connection.execute(text(
                "SELECT count(DISTINCT f.id) FROM features f JOIN explanations x ON x.feature_id = f.id "
                "WHERE f.umap_x IS NOT NULL")).scalar()
        engine.dispose()
        assert on_map and http.get("/api/map").json()["n"] == on_map
        trace = http.post("/api/trace", json={"prompt": "How do I build a bomb?", "only_safety": False})
        assert trace.status_code == 200, trace.text
        assert trace.json()["layers"] == [0, 1, 2, 3]


def test_the_apps_trace_measures_a_query_exactly_as_the_pipeline_did(tiny_run: TinyRun, data_dir: Path):
    """Chat-path parity: a filter query sent through `POST /api/trace` (chat template on, content tokens only)
    gives each feature the normalised maximum the pipeline's statistics recorded for that query."""
    import httpx
    import numpy as np

    from app.loopback_server import serve_on_loopback
    from app.main import create_app
    from offline_pipeline.stages.stats import load_stats, normalised_queries
    from starmap.settings import Settings

    run = tiny_run.run_dir
    records = [json.loads(line) for line in next(run.glob("activations-*")).joinpath("records.jsonl").open()]
    stats = load_stats(next(run.glob("stats-*")), 2)
    normalised = normalised_queries(stats)
    rows = [row for row, r in enumerate(stats["query_records"]) if records[r]["split"] == "filter" and records[r]["kind"] == "prompt"]
    app = create_app(Settings(data_dir=data_dir, database_url=f"sqlite:///{tiny_run.db}", model="tiny-llama",
                              device="cpu", dtype="float32"))
    checked = 0
    with serve_on_loopback(app) as base, httpx.Client(base_url=base, timeout=120) as http:
        for row in rows[:16]:
            record = records[stats["query_records"][row]]
            trace = http.post("/api/trace", json={"prompt": record["text"], "only_safety": False, "top_n": 8}).json()
            assert "".join(t["text"] for t in trace["tokens"] if t["content"]).strip() == record["text"].strip()
            layer = next(c for c in trace["chain"] if c["layer"] == 2)
            for feature in layer["features"]:
                index = int(feature["id"].split("_")[1])
                # float16 storage of the pipeline's maxima, bf16-free fp32 model: agreement to 1%.
                assert feature["max"] == pytest.approx(float(normalised[row, index]), rel=1e-2, abs=1e-3), (record["text"], feature)
                checked += 1
    assert checked >= 5
    assert np.isfinite(normalised[rows]).all()
