"""Every bad input gets a 4xx naming the field, never a 500; every bad CLI option one `error:` line, status 2.

Route by route on a live server (tiny model, a private database copy, `max_new_tokens` 16): lengths
of prompts and messages (in characters and in tokens), max new tokens (schema and server limits),
sampling parameters, interventions (count, duplicates, slider range per mode, feature id form, layer
hooked, index in range, normaliser known), pagination, filters, search strings, SAE set references,
preset names, and the OpenAI-compatible endpoint's parameters. Then inputs that JSON parsers let
through but JSON responses cannot hold (NaN, lone surrogates), broken bodies and oversized ones.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import copy_database, starmap, starmap_env

from app.loopback_server import serve_on_loopback

USER = [{"role": "user", "content": "How do I pick a lock?"}]
MAX_NEW = 16


@pytest.fixture(scope="module")
def served(tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[tuple[httpx.Client, Path]]:  # noqa: F811
    from app.main import create_app
    from app.state import ServerOptions

    database = copy_database(tiny_world, tmp_path_factory.mktemp("validation"))
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": f"sqlite:///{database}"})
    app = create_app(settings, ServerOptions(queue_size=4, max_new_tokens=MAX_NEW))
    with serve_on_loopback(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client, database


@pytest.fixture(scope="module")
def client(served) -> httpx.Client:
    return served[0]


def names(response: httpx.Response) -> str:
    """Every location of the error, joined ("body.messages.0.content ...")."""
    body = response.json()
    if "error" in body:  # OpenAI shape
        return f"{body['error']['param']} {body['error']['message']}"
    detail = body["detail"]
    if isinstance(detail, str):
        return detail
    return " ".join(".".join(str(part) for part in item["loc"]) for item in detail)


def expect(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:400])
    assert field in names(response), (field, response.text[:400])


def no_normaliser(database: Path) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT feature_id FROM features WHERE normaliser IS NULL AND sae_set_id = 1").fetchone()[0]


CHAT_CASES = [
    ({"messages": USER * 65}, "body.messages"),  # the server's 64-message limit
    ({"messages": USER * 257}, "body.messages"),  # the schema's
    ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "body.messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * 64_001}]}, "body.messages.0.content"),
    ({"messages": [{"role": "user", "content": "a " * 7000}]}, "body.messages"),  # 7000 tokens > 4096
    ({"messages": []}, "body.messages"),
    ({}, "body.messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "body.messages.0.role"),
    ({"messages": [{"role": "user"}]}, "body.messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "body.messages.0.content"),
    ({"messages": USER, "max_new_tokens": 0}, "body.max_new_tokens"),
    ({"messages": USER, "max_new_tokens": MAX_NEW + 1}, "body.max_new_tokens"),
    ({"messages": USER, "max_new_tokens": 4097}, "body.max_new_tokens"),
    ({"messages": USER, "max_new_tokens": "8"}, "body.max_new_tokens"),
    ({"messages": USER, "max_new_tokens": True}, "body.max_new_tokens"),
    ({"messages": USER, "temperature": -0.1}, "body.temperature"),
    ({"messages": USER, "temperature": 2.5}, "body.temperature"),
    ({"messages": USER, "top_p": 0}, "body.top_p"),
    ({"messages": USER, "top_p": 1.01}, "body.top_p"),
    ({"messages": USER, "seed": -1}, "body.seed"),
    ({"messages": USER, "seed": 2**31}, "body.seed"),
    ({"messages": USER, "seed": 1.5}, "body.seed"),
    ({"messages": USER, "top_n": 0}, "body.top_n"),
    ({"messages": USER, "top_n": 65}, "body.top_n"),
    ({"messages": USER, "domains": ["cooking"]}, "body.domains"),
    ({"messages": USER, "domains": ["violence"] * 65}, "body.domains"),
    ({"messages": USER, "domains": ["x" * 201]}, "body.domains.0"),
    ({"messages": USER, "domains": "violence"}, "body.domains"),
    ({"messages": USER, "sae_set": "x" * 201}, "body.sae_set"),
]


@pytest.mark.parametrize(("body", "field"), CHAT_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CHAT_CASES)])
def test_chat_rejects(client: httpx.Client, body: dict, field: str) -> None:
    expect(client.post("/api/chat", json={"max_new_tokens": 4, **body}), 422, field)


def test_chat_unknown_and_browse_only_sets(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    expect(client.post("/api/chat", json={"messages": USER, "max_new_tokens": 4, "sae_set": "nope"}), 404, "sae_set")
    expect(client.post("/api/chat", json={"messages": USER, "max_new_tokens": 4,
                                          "sae_set": str(tiny_world.browse_set_id)}), 409, "sae_set")


def test_steering_rejects(served, tiny_world: TinyWorld) -> None:  # noqa: F811
    client, database = served
    fid = tiny_world.safety[0]
    bare = no_normaliser(database)
    cases = [
        ([], "body.interventions"),
        ([{"feature": f"0_{i}", "mode": "ablate"} for i in range(17)], "body.interventions"),
        ([{"feature": fid, "mode": "ablate"}] * 2, "body.interventions"),
        ([{"feature": fid, "mode": "clamp", "value": 50.5}], "body.interventions.0"),
        ([{"feature": fid, "mode": "clamp", "value": -0.5}], "body.interventions.0"),
        ([{"feature": fid, "mode": "scale", "value": 10.5}], "body.interventions.0"),
        ([{"feature": fid, "mode": "add", "value": -51}], "body.interventions.0"),
        ([{"feature": fid, "mode": "warp", "value": 1}], "body.interventions.0.mode"),
        ([{"feature": fid, "mode": "ablate", "scope": "everything"}], "body.interventions.0.scope"),
        ([{"feature": fid, "mode": "scale", "value": "2"}], "body.interventions.0.value"),
        ([{"mode": "ablate"}], "body.interventions.0"),  # the message: "mode ablate needs `feature`"
        ([{"feature": "1-2", "mode": "ablate"}], "body.interventions.0.feature"),
        ([{"feature": "a_b", "mode": "ablate"}], "body.interventions.0.feature"),
        ([{"feature": "12345_1", "mode": "ablate"}], "body.interventions.0.feature"),
        ([{"feature": "1_1234567890", "mode": "ablate"}], "body.interventions.0.feature"),
        ([{"feature": "7_1", "mode": "ablate"}], "body.interventions.0.feature"),  # layer not hooked
        ([{"feature": "1_256", "mode": "ablate"}], "body.interventions.0.feature"),  # index out of range
        ([{"feature": bare, "mode": "clamp", "value": 2}], "body.interventions.0.feature"),  # no normaliser
    ]
    for interventions, field in cases:
        response = client.post("/api/steer", json={"messages": USER, "max_new_tokens": 4, "interventions": interventions})
        expect(response, 422, field)
    ok = client.post("/api/steer", json={"messages": USER, "max_new_tokens": 4,
                                         "interventions": [{"feature": bare, "mode": "scale", "value": 0.5}]})
    assert ok.status_code == 200, ok.text
    expect(client.post("/api/steer", json={"messages": USER, "max_new_tokens": MAX_NEW + 1,
                                           "interventions": [{"feature": fid, "mode": "ablate"}]}), 422, "max_new_tokens")


def test_trace_and_compare_reject(client: httpx.Client) -> None:
    cases = [
        ("/api/trace", {"prompt": ""}, "body.prompt"),
        ("/api/trace", {"prompt": "x" * 64_001}, "body.prompt"),
        ("/api/trace", {"prompt": "a " * 7000}, "body.prompt"),
        ("/api/trace", {"prompt": "hi", "top_n": 0}, "body.top_n"),
        ("/api/trace", {"prompt": "hi", "top_n": 33}, "body.top_n"),
        ("/api/trace", {"prompt": "hi", "only_safety": 1}, "body.only_safety"),
        ("/api/trace", {"prompt": "hi", "chat_template": "yes"}, "body.chat_template"),
        ("/api/trace", {"prompt": ["hi"]}, "body.prompt"),
        ("/api/compare", {"prompt_a": "hi"}, "body.prompt_b"),
        ("/api/compare", {"prompt_a": "hi", "prompt_b": "a " * 7000}, "body.prompt_b"),
        ("/api/compare", {"prompt_a": "hi", "prompt_b": "yo", "n_differences": 0}, "body.n_differences"),
        ("/api/compare", {"prompt_a": "hi", "prompt_b": "yo", "n_differences": 201}, "body.n_differences"),
    ]
    for path, body, field in cases:
        expect(client.post(path, json=body), 422, field)


def test_listing_and_search_reject(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    cases = [
        ("/api/features", {"limit": 0}, "query.limit"),
        ("/api/features", {"limit": 501}, "query.limit"),
        ("/api/features", {"limit": "ten"}, "query.limit"),
        ("/api/features", {"offset": -1}, "query.offset"),
        ("/api/features", {"offset": 1_000_001}, "query.offset"),
        ("/api/features", {"layer": -1}, "query.layer"),
        ("/api/features", {"layer": 1001}, "query.layer"),
        ("/api/features", {"layer": 9}, "query.layer"),  # not a layer of the set
        ("/api/features", {"min_score": -1.5}, "query.min_score"),
        ("/api/features", {"min_score": "nan"}, "query.min_score"),
        ("/api/features", {"q": "x" * 201}, "query.q"),
        ("/api/features", {"domain": "x" * 65}, "query.domain"),
        ("/api/features", {"sae_set": "x" * 201}, "query.sae_set"),
        ("/api/map", {"layer": 9}, "query.layer"),
        ("/api/map", {"min_score": "inf"}, "query.min_score"),
        ("/api/map", {"domain": "x" * 65}, "query.domain"),
    ]
    for path, params, field in cases:
        expect(client.get(path, params=params), 422, field)
    expect(client.get("/api/features", params={"sae_set": "nope"}), 404, "query.sae_set")
    expect(client.get("/api/features/abc"), 422, "path.feature_id")
    expect(client.get("/api/features/12345_1"), 422, "path.feature_id")
    expect(client.get("/api/features/1_99999"), 404, "path.feature_id")
    expect(client.get("/features/abc"), 422, "path.feature_id")
    # Search strings are words, bound as a parameter: SQL and FTS syntax is just text.
    for query in ["'); DROP TABLE features; --", '"unbalanced', "NEAR(", "a OR b", "*", "^", "col:val", "\x00", "weap*"]:
        response = client.get("/api/features", params={"q": query, "limit": 500})
        assert response.status_code == 200, (query, response.text)
    assert client.get("/api/features", params={"q": "weap*"}).json()["items"], "a word prefix stops matching"
    beyond = client.get("/api/features", params={"offset": 1_000_000}).json()
    assert beyond["items"] == [] and beyond["has_more"] is False


def test_presets_reject(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    good = [{"feature": tiny_world.safety[0], "mode": "ablate"}]
    cases = [
        ({"name": "", "interventions": good}, "body.name"),
        ({"name": "x" * 121, "interventions": good}, "body.name"),
        ({"name": "../../etc/passwd", "interventions": good}, "body.name"),
        ({"name": "<script>", "interventions": good}, "body.name"),
        ({"name": "ok", "interventions": []}, "body.interventions"),
        ({"name": "ok", "interventions": [{"feature": "9_1", "mode": "ablate"}]}, "body.interventions.0.feature"),
        ({"name": "ok", "interventions": good, "sae_set": "x" * 201}, "body.sae_set"),
    ]
    for body, field in cases:
        expect(client.post("/api/presets", json=body), 422, field)
    expect(client.post("/api/presets", json={"name": "ok", "interventions": good, "sae_set": "nope"}), 404, "sae_set")
    expect(client.get("/api/presets", params={"sae_set": "nope"}), 404, "sae_set")
    expect(client.get("/api/presets/missing"), 404, "path.name")
    expect(client.delete("/api/presets/missing"), 404, "path.name")


def test_openai_endpoint_rejects(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    model = str(tiny_world.model_dir)
    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_NEW + 1}, "max_tokens"),
        ({"max_tokens": 4097}, "max_tokens"),
        ({"max_completion_tokens": MAX_NEW + 1}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 64_001}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "a " * 7000}]}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
            "a": {"$ref": "#/x"}}}}}}, "response_format"),
    ]
    for extra, field in cases:
        body = {"model": model, "messages": USER, "max_tokens": 4, **extra}
        expect(client.post("/v1/chat/completions", json=body), 400, field)
    expect(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER}), 404, "gpt-4")


def test_inputs_json_cannot_carry_back_are_rejected_not_crashed(client: httpx.Client) -> None:
    raw = [
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 422, "body.temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 422, "body.top_p"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 422, "body.messages.0.content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "sae_set": "\\udfff"}', 422, "body.sae_set"),
        (b'{"messages": ', 422, "body"),
        (b"[" * 100_000, 400, "body"),  # nesting deeper than the parser's recursion limit
    ]
    for content, status, field in raw:
        response = client.post("/api/chat", content=content, headers={"content-type": "application/json"})
        expect(response, status, field)
        json.dumps(response.json(), allow_nan=False)  # a valid JSON answer, even echoing the input
    steer = b'{"messages": [{"role": "user", "content": "hi"}], "interventions": [{"feature": "0_1", "mode": "scale", "value": NaN}]}'
    expect(client.post("/api/steer", content=steer, headers={"content-type": "application/json"}), 422, "interventions")
    assert client.post("/api/chat", content=b"\xff\xfe\x00", headers={"content-type": "application/json"}).status_code in (400, 422)
    assert client.post("/api/chat", content=b"x" * (5 << 20), headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}).json()["error"]
    unsupported = client.request("PUT", "/api/presets")
    assert unsupported.status_code == 405 and set(unsupported.headers["allow"].split(", ")) == {"GET", "POST"}


# ---------------------------------------------------------------- the command line


CLI_CASES = [
    (["serve", "--port", "abc"], "--port"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--queue-size", "0"], "--queue-size"),
    (["serve", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["serve", "--max-new-tokens", "5000"], "--max-new-tokens"),
    (["serve", "--bogus"], "--bogus"),
    (["--database-url", "not a url", "serve", "--no-model"], "database URL"),
    (["--data-dir", "/dev/null/x", "serve", "--no-model"], "data directory /dev/null/x"),
    (["train-sae", "--k", "0"], "--k"),
    (["train-sae", "--tokens", "-5"], "--tokens"),
    (["train-sae", "--batch-size", "8"], "--batch-size"),
    (["train-sae", "--context-size", "x"], "--context-size"),
    (["train-sae", "--texts", "/nonexistent/texts.jsonl", "--tokens", "10"], "/nonexistent/texts.jsonl"),
    (["db", "downgrade"], "--revision"),
    (["db", "upgrade", "--revision", "nope"], "'nope'"),
    (["db", "nosuch"], "nosuch"),
    (["--database-url", "not a url", "db", "info"], "database URL"),
    (["--data-dir", "/dev/null/x", "db", "info"], "data directory /dev/null/x"),
    (["data", "show", "--n", "0"], "--n"),
    (["data", "show", "--split", "nope"], "--split"),
    (["data", "show", "--domain", "nope"], "--domain"),
    (["data", "build", "--batch-size", "0"], "--batch-size"),
    (["import", "safe-sail"], "--db"),
    (["import", "safe-sail", "--db", "/nonexistent/en_db.json"], "/nonexistent/en_db.json"),
    (["import", "safe-sail", "--db", "/etc/hostname"], "/etc/hostname"),
    (["nosuchverb"], "nosuchverb"),
]


@pytest.mark.parametrize(("args", "named"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_rejects_bad_options_in_one_line(args: list[str], named: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from starmap.cli import app

    if "--database-url" not in args and "--data-dir" not in args:
        args = ["--database-url", f"sqlite:///{tmp_path / 'cli.db'}", "--data-dir", str(tmp_path), *args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_the_installed_command_prints_one_line(data_dir: Path, tmp_path: Path) -> None:
    result = starmap("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "serve", "--port", "abc",
                     env=starmap_env(data_dir))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Invalid value for '--port'" in result.stderr, result.stderr
