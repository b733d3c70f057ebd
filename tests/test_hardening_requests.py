"""Unknown request fields are refused by name, and a database locked by another writer answers 503, not 500.

On a live server (tiny model, a private database copy): every JSON body of `/api/*` refuses a field its
model lacks with a 422 naming it (and the closest known field, so `max_tokens` points at `max_new_tokens`),
while the OpenAI-compatible `/v1` routes keep OpenAI's tolerance of extra fields. Then another connection
holds the SQLite write lock, as a pipeline writing the served database does: the preset writes answer 503
with Retry-After within a few seconds, write nothing, and succeed once the lock is released. The same on
PostgreSQL, where a table lock held elsewhere outlasts the server's lock_timeout.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import copy_database
from postgres import postgres_server  # noqa: F401

from app.loopback_server import serve_on_loopback
from app.main import create_app
from app.state import ServerOptions
from starmap.db import make_engine, make_sessionmaker, upgrade
from starmap.db.models import Model, Sae, SaeSet
from starmap.settings import Settings

USER = [{"role": "user", "content": "How do I pick a lock?"}]
BUSY_WITHIN_S = 5.0  # the server waits db_lock_timeout_s (2 s by default) for the lock, then answers


@pytest.fixture(scope="module")
def served(tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[tuple[httpx.Client, Path]]:  # noqa: F811
    database = copy_database(tiny_world, tmp_path_factory.mktemp("requests"))
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": f"sqlite:///{database}"})
    app = create_app(settings, ServerOptions(queue_size=4, max_new_tokens=16))
    with serve_on_loopback(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client, database


def only_error(response: httpx.Response) -> dict:
    assert response.status_code == 422, (response.status_code, response.text[:400])
    detail = response.json()["detail"]
    assert len(detail) == 1, detail
    return detail[0]


def unknown_field_cases(feature: str) -> list[tuple[str, dict, list, str]]:
    """(path, body, the error's loc, its message) for a misspelt or foreign field in each request model."""
    ablate = {"feature": feature, "mode": "ablate"}
    return [
        ("/api/chat", {"messages": USER, "max_tokens": 4}, ["body", "max_tokens"],
         "unknown field 'max_tokens'; did you mean 'max_new_tokens'?"),
        ("/api/chat", {"messages": [{**USER[0], "name": "alice"}], "max_new_tokens": 4}, ["body", "messages", 0, "name"],
         "unknown field 'name'"),
        ("/api/chat", {"messages": USER, "max_new_tokens": 4, "stream": True}, ["body", "stream"],
         "unknown field 'stream'"),
        ("/api/steer", {"messages": USER, "max_tokens": 4, "interventions": [ablate]}, ["body", "max_tokens"],
         "unknown field 'max_tokens'; did you mean 'max_new_tokens'?"),
        ("/api/steer", {"messages": USER, "max_new_tokens": 4, "interventions": [{**ablate, "scop": "both"}]},
         ["body", "interventions", 0, "scop"], "unknown field 'scop'; did you mean 'scope'?"),
        ("/api/trace", {"prompt": "hi", "top_k": 3}, ["body", "top_k"], "unknown field 'top_k'; did you mean 'top_n'?"),
        ("/api/compare", {"prompt_a": "hi", "prompt_b": "yo", "n_difference": 3}, ["body", "n_difference"],
         "unknown field 'n_difference'; did you mean 'n_differences'?"),
        ("/api/presets", {"name": "typo", "interventions": [ablate], "saeset": "1"}, ["body", "saeset"],
         "unknown field 'saeset'; did you mean 'sae_set'?"),
    ]


def test_unknown_fields_are_refused_by_name(served, tiny_world: TinyWorld) -> None:  # noqa: F811
    client, _ = served
    for path, body, loc, message in unknown_field_cases(tiny_world.safety[0]):
        error = only_error(client.post(path, json=body))
        assert (error["type"], error["loc"], error["msg"]) == ("extra_forbidden", loc, message), (path, error)
    assert client.get("/api/presets/typo").status_code == 404, "a refused preset was saved"


def test_the_openai_routes_keep_tolerating_unknown_fields(served, tiny_world: TinyWorld) -> None:  # noqa: F811
    client, _ = served
    body = {"model": str(tiny_world.model_dir), "messages": [{**USER[0], "name": "alice"}], "max_tokens": 2,
            "user": "someone", "frequency_penalty": 0, "some_future_option": {"x": 1}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text[:400]
    assert response.json()["object"] == "chat.completion"


def test_the_schema_declares_no_additional_properties(served) -> None:
    client, _ = served
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    closed = {"ChatRequest", "SteerRequest", "TraceRequest", "CompareRequest", "PresetIn", "Message", "InterventionIn"}
    for name in closed:
        found = [schemas[key] for key in schemas if key == name or key.startswith(f"{name}-")]
        assert found and all(schema.get("additionalProperties") is False for schema in found), (name, found)
    assert schemas["ChatCompletionRequest"].get("additionalProperties") is not False


def lock_writes(database: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock, as a pipeline run writing it does."""
    holder = sqlite3.connect(database, timeout=0, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def expect_busy(response: httpx.Response, started: float) -> None:
    elapsed = time.monotonic() - started
    assert response.status_code == 503, (response.status_code, response.text[:400])
    assert int(response.headers["retry-after"]) >= 1
    assert "database is busy" in response.json()["detail"], response.text
    assert elapsed < BUSY_WITHIN_S, f"answered after {elapsed:.1f} s"


def test_preset_writes_answer_busy_while_another_process_writes(served, tiny_world: TinyWorld) -> None:  # noqa: F811
    client, database = served
    preset = {"name": "busy", "interventions": [{"feature": tiny_world.safety[0], "mode": "ablate"}]}
    kept = {**preset, "name": "kept"}
    assert client.post("/api/presets", json=kept).status_code == 201
    holder = lock_writes(database)
    try:
        started = time.monotonic()
        expect_busy(client.post("/api/presets", json=preset), started)
        started = time.monotonic()
        expect_busy(client.delete("/api/presets/kept"), started)
        assert client.get("/api/presets/kept").status_code == 200, "reads must go on while a writer holds the lock"
    finally:
        holder.rollback()
        holder.close()
    with sqlite3.connect(database) as db:
        names = {name for (name,) in db.execute("SELECT name FROM steering_presets")}
    assert "busy" not in names and "kept" in names, names  # the failed writes were rolled back, whole
    assert client.post("/api/presets", json=preset).status_code == 201
    assert client.delete("/api/presets/kept").status_code == 204


def test_preset_writes_answer_busy_on_postgresql(postgres_server, tmp_path: Path) -> None:  # noqa: F811
    import psycopg

    url = postgres_server.create_database()
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        model = Model(name="some/model", n_layers=1, d_model=8, source="test")
        sae_set = SaeSet(model=model, name="pg-set", hook_kind="mlp_out", k=4, expansion=2, d_sae=16, origin="pipeline")
        session.add_all([model, sae_set])
        session.flush()
        session.add(Sae(sae_set_id=sae_set.id, layer=0, hook_name="blocks.0.hook_mlp_out"))
        session.commit()
    engine.dispose()
    preset = {"name": "pg", "interventions": [{"feature": "0_1", "mode": "ablate"}]}
    app = create_app(Settings(data_dir=tmp_path, database_url=url), ServerOptions(load_model=False))
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with serve_on_loopback(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        with psycopg.connect(conninfo) as holder:
            holder.execute("LOCK TABLE steering_presets IN EXCLUSIVE MODE")  # reads pass, writes wait
            started = time.monotonic()
            expect_busy(http.post("/api/presets", json=preset), started)
            holder.rollback()
        assert http.get("/api/presets/pg").status_code == 404
        assert http.post("/api/presets", json=preset).status_code == 201
