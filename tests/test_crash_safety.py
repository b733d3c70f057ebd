"""Crash safety: SIGKILL never loses an acknowledged write, leaves a lock, or a half-written database.

- The pipeline (`starmap pipeline run --preset tiny`, its own process and database) is killed at
  three stages: while writing the activation cache, while explaining, and inside the database
  write. Each time the database is intact right after the kill, and the next run completes with a
  database equal to an uninterrupted run's (features, explanations, scores, domains, examples:
  ordered dumps). The three kills share one run folder: after the first, the later stages are
  re-entered with `--force-stage`, the way a user re-runs a stage.
- A server (`starmap serve`) is killed while clients save, replace and delete steering presets and a
  chat streams: every preset the server acknowledged is in the file, the file passes
  `PRAGMA integrity_check`, it can be written at once (no stale lock), and a new server runs on it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import REPO, copy_database, serve

DUMPS = {
    "features": "SELECT f.feature_id, f.layer, f.\"index\", round(f.density, 9), round(f.max_activation, 6), "
    "round(f.normaliser, 6), f.quantiles, f.histogram, f.top_tokens, f.bottom_tokens, round(f.umap_x, 5), "
    "round(f.umap_y, 5), f.is_safety, f.candidate_only FROM features f ORDER BY f.feature_id",
    "explanations": "SELECT f.feature_id, x.text, x.language, x.explainer, x.explainer_model FROM explanations x "
    "JOIN features f ON f.id = x.feature_id ORDER BY f.feature_id, x.text",
    "scores": "SELECT f.feature_id, s.method, s.value, s.simulator, s.n_queries, s.n_parse_failures FROM scores s "
    "JOIN explanations x ON x.id = s.explanation_id JOIN features f ON f.id = x.feature_id "
    "ORDER BY f.feature_id, s.method",
    "domains": "SELECT f.feature_id, d.name, fd.source FROM feature_domains fd JOIN features f ON f.id = fd.feature_id "
    "JOIN domains d ON d.id = fd.domain_id ORDER BY f.feature_id, d.name",
    "examples": "SELECT f.feature_id, e.level, e.rank, e.tokens, e.activations, e.source FROM examples e "
    "JOIN features f ON f.id = e.feature_id ORDER BY f.feature_id, e.level, e.rank, e.source",
    "sets": "SELECT s.name, s.hook_kind, s.k, s.d_sae, s.origin, m.name FROM sae_sets s JOIN models m ON m.id = s.model_id "
    "ORDER BY s.name",
}


def dump(database: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return {name: db.execute(sql).fetchall() for name, sql in DUMPS.items()}


def check_whole_and_writable(database: Path) -> None:
    """Integrity, and a write that needs the lock at once: a dead writer must not hold it."""
    with sqlite3.connect(database, timeout=1) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS crash_probe (x)")
        db.execute("DROP TABLE crash_probe")
        db.commit()


def pipeline(data_dir: Path, run_dir: Path, database: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARMAP_")}
    env.update(STARMAP_DATA_DIR=str(data_dir), STARMAP_DATABASE_URL=f"sqlite:///{database}", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "starmap.cli", "pipeline", "run", "--preset", "tiny", "--run-dir", str(run_dir), *extra]
    with open(log, "a") as sink:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-4000:]


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
    return lambda: any(not (folder / "DONE.json").exists() for folder in run_dir.glob(f"{stage}-*"))


@pytest.mark.slow
def test_pipeline_killed_at_three_stages_resumes_to_the_same_database(data_dir: Path, smollm2_dir: Path,
                                                                      tmp_path: Path) -> None:
    from sae_engine.models import tiny_model_dir

    tiny_model_dir(data_dir)  # built once here, not by two pipelines at the same time
    clean_db, crashed_db = tmp_path / "clean.db", tmp_path / "crashed.db"
    run_dir, log = tmp_path / "crashed", tmp_path / "crashed.log"
    clean = pipeline(data_dir, tmp_path / "clean", clean_db, tmp_path / "clean.log")
    # The uninterrupted run goes ahead; the crashed one starts once the shared corpus cache is read.
    kill_point = stage_running(tmp_path / "clean", "activations")
    while not kill_point() and clean.poll() is None:
        time.sleep(0.05)
    kills = []

    # 1. Inside the activation cache (a fresh run: the database is migrated but empty).
    process = pipeline(data_dir, run_dir, crashed_db, log)
    kill_when(process, stage_running(run_dir, "activations"), log)
    kills.append(("activations", crashed_db.exists()))
    finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    finish(clean, tmp_path / "clean.log")
    reference = dump(clean_db)
    assert reference["explanations"] and reference["scores"], "the tiny run explained nothing"
    assert dump(crashed_db) == reference

    # 2. While explaining (the database holds the previous, complete run).
    process = pipeline(data_dir, run_dir, crashed_db, log, "--force-stage", "explain")
    kill_when(process, stage_running(run_dir, "explain"), log)
    kills.append(("explain", True))
    check_whole_and_writable(crashed_db)
    assert dump(crashed_db) == reference
    finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    assert dump(crashed_db) == reference

    # 3. Inside the database write: once its transaction has written to the WAL.
    wal = crashed_db.with_name(crashed_db.name + "-wal")
    process = pipeline(data_dir, run_dir, crashed_db, log, "--force-stage", "database")
    kill_when(process, lambda: stage_running(run_dir, "database")() and wal.exists() and wal.stat().st_size > 0, log)
    assert not any((f / "DONE.json").exists() for f in run_dir.glob("database-*")), "the write finished before the kill"
    kills.append(("database", True))
    check_whole_and_writable(crashed_db)
    assert dump(crashed_db) == reference, "a killed database write left part of itself behind"
    finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    assert dump(crashed_db) == reference
    check_whole_and_writable(crashed_db)
    text = log.read_text()
    for stage in ("activations", "explain", "database"):
        assert f"[{stage}] running" in text
    assert [stage for stage, _ in kills] == ["activations", "explain", "database"]


def test_killed_server_loses_no_acknowledged_write(tiny_world: TinyWorld, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    database = copy_database(tiny_world, tmp_path)
    fid = tiny_world.safety[0]
    acknowledged: dict[str, int] = {}  # name -> number of interventions the server confirmed
    stop = threading.Event()
    failures: list[str] = []

    def writer(k: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                name = f"writer {k} preset {i // 3}"
                size = 1 + i % 3  # create, then replace twice with more interventions
                body = {"name": name, "interventions": [{"feature": f"{layer}_{i % 200}", "mode": "ablate"}
                                                        for layer in range(size)]}
                try:
                    if http.post("/api/presets", json=body).status_code in (200, 201):
                        acknowledged[name] = size
                    if i % 7 == 6:
                        acknowledged.pop(name, None)  # from the request on, the preset may be gone
                        assert http.delete(f"/api/presets/{name}").status_code == 204
                except httpx.TransportError:
                    return  # the server is gone
                except AssertionError as error:
                    failures.append(f"{name}: {error}")
                    return
                i += 1

    with serve(tiny_world, database, data_dir, tmp_path / "server.log", "--max-new-tokens", "4000") as server:
        threads = [threading.Thread(target=writer, args=(k, server.url), daemon=True) for k in range(4)]
        for thread in threads:
            thread.start()
        with httpx.Client(base_url=server.url, timeout=30) as http, http.stream(
                "POST", "/api/chat", json={"messages": [{"role": "user", "content": fid}], "max_new_tokens": 4000,
                                           "temperature": 1.0}) as chat:
            assert chat.status_code == 200
            deadline = time.monotonic() + 120
            while len(acknowledged) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures
    assert len(acknowledged) >= 40, "the writers made too little progress to test anything"

    check_whole_and_writable(database)
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        stored = {name: len(json.loads(interventions))
                  for name, interventions in db.execute("SELECT name, interventions FROM steering_presets")}
    for name, size in acknowledged.items():
        # A write after the last acknowledged one may have committed before its answer was sent.
        assert name in stored and stored[name] >= size, (name, size, stored.get(name))
    with serve(tiny_world, database, data_dir, tmp_path / "server-again.log") as again:
        saved = httpx.post(f"{again.url}/api/presets", json={"name": "after the crash",
                                                           "interventions": [{"feature": fid, "mode": "ablate"}]})
        assert saved.status_code == 201, saved.text
        assert "after the crash" in {p["name"] for p in httpx.get(f"{again.url}/api/presets").json()}
    check_whole_and_writable(database)
