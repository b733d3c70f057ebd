"""Crash safety: SIGKILL never loses an acknowledged write, leaves a lock, or a half-written database.

- The pipeline (`starmap pipeline run --preset tiny`, its own process and database) is killed at
  four stages: while writing the activation cache, while training, while explaining, and inside the
  database write. Each time the database is intact right after the kill, and the next run resumes
  (the finished stages skipped) to a database equal to the session's uninterrupted run's (every
  result table: ordered dumps). The kills share one run folder: after the second, the later stages
  are re-entered with `--force-stage`, the way a user re-runs a stage.
- A server (`starmap serve`) is killed while clients save, replace and delete steering presets and a
  chat streams: every preset the server acknowledged is in the file, the file passes
  `PRAGMA integrity_check`, it can be written at once (no stale lock), and a new server runs on it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import copy_database, serve
from pipeline_support import RESULT_TABLES, TinyRun, dump, finish, kill_when, pipeline, stage_running

from offline_pipeline.runner import DONE


def check_whole_and_writable(database: Path) -> None:
    """Integrity, and a write that needs the lock at once: a dead writer must not hold it."""
    with sqlite3.connect(database, timeout=1) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS crash_probe (x)")
        db.execute("DROP TABLE crash_probe")
        db.commit()


def features_written(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM features").fetchone()[0]


@pytest.mark.slow
def test_pipeline_killed_at_four_stages_resumes_to_the_same_database(tiny_run: TinyRun, data_dir: Path,
                                                                     tmp_path: Path) -> None:
    reference = dump(tiny_run.db, RESULT_TABLES)
    assert reference["explanations"] and reference["scores"], "the tiny run explained nothing"
    crashed_db, run_dir, log = tmp_path / "crashed.db", tmp_path / "crashed", tmp_path / "crashed.log"

    # 1. Inside the activation cache (a fresh run: the database is migrated but empty).
    kill_when(pipeline(data_dir, run_dir, crashed_db, log), stage_running(run_dir, "activations"), log)
    assert crashed_db.exists()
    # 2. While training: the stages before it are kept, nothing is written to the database before its own stage.
    kill_when(pipeline(data_dir, run_dir, crashed_db, log), stage_running(run_dir, "train"), log)
    train = next(run_dir.glob("train-*"))
    assert not (train / DONE).exists() and features_written(crashed_db) == 0
    before = log.stat().st_size
    finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    resumed = log.read_bytes()[before:].decode(errors="replace")
    for stage in ("corpus", "activations", "sweep", "choose"):
        assert f"[{stage}] done, skipped" in resumed
    assert "[train] running" in resumed and "[database] running" in resumed
    assert dump(crashed_db, RESULT_TABLES) == reference

    # 3. While explaining (the database holds the previous, complete run).
    process = pipeline(data_dir, run_dir, crashed_db, log, "--force-stage", "explain")
    kill_when(process, stage_running(run_dir, "explain"), log)
    check_whole_and_writable(crashed_db)
    assert dump(crashed_db, RESULT_TABLES) == reference
    finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    assert dump(crashed_db, RESULT_TABLES) == reference

    # 4. Inside the database write: once its transaction has written to the WAL.
    wal = crashed_db.with_name(crashed_db.name + "-wal")
    process = pipeline(data_dir, run_dir, crashed_db, log, "--force-stage", "database")
    kill_when(process, lambda: stage_running(run_dir, "database")() and wal.exists() and wal.stat().st_size > 0, log)
    assert not any((f / DONE).exists() for f in run_dir.glob("database-*")), "the write finished before the kill"
    check_whole_and_writable(crashed_db)
    assert dump(crashed_db, RESULT_TABLES) == reference, "a killed database write left part of itself behind"
    text = finish(pipeline(data_dir, run_dir, crashed_db, log), log)
    assert dump(crashed_db, RESULT_TABLES) == reference
    check_whole_and_writable(crashed_db)
    for stage in ("activations", "train", "explain", "database"):
        assert f"[{stage}] running" in text


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
