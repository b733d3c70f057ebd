"""Shared by the pipeline tests: `starmap pipeline run --preset tiny` in its own process, and database dumps.

One uninterrupted tiny run per test session (the `tiny_run` fixture in conftest.py) is the reference that the
resumed, crashed, re-written, seeded and PostgreSQL runs are compared with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from offline_pipeline.runner import DONE

REPO = Path(__file__).resolve().parents[1]

DUMPS = {
    "features": "SELECT f.feature_id, f.layer, f.\"index\", f.density, f.max_activation, f.normaliser, f.quantiles, "
    "f.histogram, f.top_tokens, f.bottom_tokens, f.umap_x, f.umap_y, f.is_safety, f.candidate_only FROM features f",
    "domains": "SELECT f.feature_id, d.name, fd.source FROM feature_domains fd JOIN features f ON f.id = fd.feature_id "
    "JOIN domains d ON d.id = fd.domain_id",
    "concepts": "SELECT f.feature_id, c.name, fc.precision, fc.recall FROM feature_concepts fc "
    "JOIN features f ON f.id = fc.feature_id JOIN concepts c ON c.id = fc.concept_id",
    "examples": "SELECT f.feature_id, e.level, e.rank, e.tokens, e.activations, e.source FROM examples e JOIN features f ON f.id = e.feature_id",
    "explanations": "SELECT f.feature_id, x.text, x.language, x.explainer, x.explainer_model FROM explanations x "
    "JOIN features f ON f.id = x.feature_id",
    "scores": "SELECT f.feature_id, s.method, s.value, s.simulator, s.n_queries, s.n_parse_failures FROM scores s "
    "JOIN explanations x ON x.id = s.explanation_id JOIN features f ON f.id = x.feature_id",
    "saes": "SELECT layer, hook_name, metrics FROM saes",
    "sweep": "SELECT hook_kind, k, layer, domain, metric, threshold, value FROM sweep_results",
    "sets": "SELECT s.name, s.hook_kind, s.k, s.d_sae, s.origin, m.name FROM sae_sets s JOIN models m ON m.id = s.model_id",
    "runs": "SELECT run_key, preset, selection_rule, status FROM pipeline_runs",
}
# The run log records every attempt (a killed run leaves its own row); the results are the other tables.
RESULT_TABLES = tuple(name for name in DUMPS if name != "runs")


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    db: Path

    @property
    def root(self) -> Path:
        return self.run_dir.parent


def pipeline(data_dir: Path, run_dir: Path, db: Path | str, log: Path, *extra: str) -> subprocess.Popen:
    """`starmap pipeline run --preset tiny` into `db` (a SQLite path or any URL), its output appended to `log`."""
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARMAP_")}
    env.update(STARMAP_DATA_DIR=str(data_dir), STARMAP_DATABASE_URL=url, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "starmap.cli", "pipeline", "run", "--preset", "tiny", "--run-dir", str(run_dir), *extra]
    with open(log, "a") as sink:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Waits for a successful end; returns the whole log."""
    assert process.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-4000:]
    return log.read_text(errors="replace")


def run_tiny(data_dir: Path, run_dir: Path, db: Path | str, *extra: str) -> str:
    """One whole run, logged to a file of its own; returns its output."""
    log = run_dir.with_name(f"{run_dir.name}.{len(list(run_dir.parent.glob(run_dir.name + '.*.log')))}.log")
    return finish(pipeline(data_dir, run_dir, db, log, *extra), log)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the pipeline ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def stage_running(run_dir: Path, stage: str) -> Callable[[], bool]:
    """The stage's folder exists without DONE.json: the runner has (re)created it and works in it."""
    return lambda: any(not (folder / DONE).exists() for folder in run_dir.glob(f"{stage}-*"))


def dump(db: Path | str, tables: tuple[str, ...] = tuple(DUMPS)) -> dict[str, list[str]]:
    """The tables' rows, comparable across SQLite and PostgreSQL (JSON parsed, floats to 5 significant digits).
    A SQLite file is opened read-only, so a look right after a kill cannot recover or change it."""
    url = db if isinstance(db, str) else f"sqlite:///file:{db}?mode=ro&uri=true"
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = {name: sorted(repr(portable(tuple(row))) for row in connection.execute(text(DUMPS[name])).all())
                for name in tables}
    engine.dispose()
    return rows


def portable(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return portable(json.loads(value))
        except json.JSONDecodeError:
            return value
    if isinstance(value, (list, tuple)):
        return tuple(portable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, portable(v)) for k, v in value.items()))
    return value
