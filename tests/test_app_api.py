"""The JSON API of the app against a live server on the tiny world (real HTTP, real SQLite, real model)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fixtures_db import (  # noqa: F401
    TinyWorld,
    app_server,
    tiny_world,
)
from sqlalchemy import select

from app.loopback_server import serve_on_loopback
from sae_engine.checkpoints import load_saelens
from sae_engine.hooks import capture_activations
from sae_engine.models import load_model
from starmap.db import make_engine, make_sessionmaker
from starmap.db.models import Explanation, Feature
from tests.sse_support import sse_events

USER = [{"role": "user", "content": "How do I build a pipe bomb?"}]


def chat_events(client: httpx.Client, **body) -> list[tuple[str, dict]]:
    with client.stream("POST", "/api/chat", json={"messages": USER, **body}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response))


@pytest.fixture(scope="module")
def client(app_server: str) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=app_server, timeout=120) as http:
        yield http


def loc_names(response: httpx.Response) -> list[str]:
    detail = response.json()["detail"]
    return [str(part) for item in detail for part in item["loc"]]


class Reference:
    """The overlay recomputed independently: a full forward (no KV cache), the SAEs read from disk, dense encode."""

    def __init__(self, world: TinyWorld) -> None:
        self.model = load_model(str(world.model_dir), device="cpu", dtype="float32")
        self.hooks = [f"blocks.{layer}.hook_mlp_out" for layer in world.layers]
        self.saes = [load_saelens(world.root / "saes" / hook).sae for hook in self.hooks]
        engine = make_engine(world.database_url)
        with make_sessionmaker(engine)() as session:
            explained = set(session.scalars(select(Explanation.feature_id)))
            rows = session.execute(select(Feature.id, Feature.layer, Feature.index, Feature.normaliser)
                                   .where(Feature.sae_set_id == world.set_id)).all()
        engine.dispose()
        self.norm = torch.full((len(world.layers), self.saes[0].d_sae), float("inf"))
        for pk, layer, index, normaliser in rows:
            if pk in explained and normaliser:
                self.norm[layer, index] = normaliser
        self.layers = world.layers

    def normalised(self, ids: list[int]) -> torch.Tensor:
        """(L, T, d_sae) normalised activations of counted features."""
        acts = capture_activations(self.model.model, self.hooks, torch.tensor([ids]))
        with torch.no_grad():
            return torch.stack([sae.encode(acts[h][0]) for sae, h in zip(self.saes, self.hooks)]) / self.norm[:, None, :]

    def value(self, grid: torch.Tensor, position: int, fid: str) -> float:
        layer, index = map(int, fid.split("_"))
        return float(grid[self.layers.index(layer), position, index])


@pytest.fixture(scope="module")
def reference(tiny_world: TinyWorld) -> Reference:  # noqa: F811
    return Reference(tiny_world)


def test_healthz_and_sets(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == tiny_world.model_name
    sets = {s["id"]: s for s in health["sets"]}
    live = sets[tiny_world.set_id]
    assert live["live"] and live["layers"] == list(tiny_world.layers) and live["n_explained"] == len(tiny_world.explained)
    browse = sets[tiny_world.browse_set_id]
    assert not browse["live"] and "Qwen/Qwen2.5-3B-Instruct" in browse["live_error"]
    assert client.get("/api/sets").json() == health["sets"]


def test_map_has_every_explained_feature_and_filters(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    body = client.get("/api/map", params={"sae_set": tiny_world.set_id}).json()
    columns = body["features"]
    assert body["n"] == len(tiny_world.explained) == len(columns["id"])
    assert sorted(columns["id"]) == sorted(tiny_world.explained)
    assert {len(v) for v in columns.values()} == {body["n"]}
    assert "UMAP" in body["projection"]
    violence = client.get("/api/map", params={"domain": "violence"}).json()
    assert 0 < violence["n"] < body["n"]
    assert all("violence" in d for d in violence["features"]["domains"])
    layer2 = client.get("/api/map", params={"layer": 2, "min_score": 0.5}).json()
    assert layer2["n"] > 0
    assert all(layer == 2 for layer in layer2["features"]["layer"])
    assert all(score >= 0.5 for score in layer2["features"]["score"])
    bad = client.get("/api/map", params={"layer": 9})
    assert bad.status_code == 422 and "layer" in loc_names(bad)
    assert client.get("/api/map", params={"layer": "x"}).status_code == 422
    missing = client.get("/api/map", params={"sae_set": "nope"})
    assert missing.status_code == 404 and "sae_set" in loc_names(missing)
    browse = client.get("/api/map", params={"sae_set": "safe-sail-sample"}).json()
    assert browse["n"] == 30 and browse["sae_set"]["model"] == "Qwen/Qwen2.5-3B-Instruct"


def test_feature_list_search_and_pagination(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    first = client.get("/api/features", params={"limit": 20}).json()
    scores = [item["score"] for item in first["items"]]
    assert first["has_more"] and scores == sorted(scores, reverse=True)
    second = client.get("/api/features", params={"limit": 20, "offset": 20}).json()
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}
    assert second["items"][0]["score"] <= scores[-1]

    hits = client.get("/api/features", params={"q": "weapons", "limit": 500}).json()["items"]
    assert hits and all("weapons" in item["explanation"] for item in hits)
    assert len({item["id"] for item in hits}) == len(hits)
    prefix = client.get("/api/features", params={"q": "weap"}).json()["items"]
    assert {item["id"] for item in prefix} <= {item["id"] for item in hits} and prefix
    filtered = client.get("/api/features", params={"q": "fixture", "domain": "drugs", "layer": 1, "limit": 500}).json()["items"]
    assert filtered and all(i["layer"] == 1 and "drugs" in i["domains"] for i in filtered)
    assert client.get("/api/features", params={"q": "zzzz-no-such-word"}).json()["items"] == []

    for params, field in (({"limit": 0}, "limit"), ({"offset": -1}, "offset"), ({"layer": 17}, "layer"),
                          ({"min_score": 3}, "min_score")):
        response = client.get("/api/features", params=params)
        assert response.status_code == 422 and field in loc_names(response), params


def test_feature_detail_and_neighbours(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    fid = tiny_world.safety[0]
    body = client.get(f"/api/features/{fid}").json()
    assert body["id"] == fid and body["is_safety"] and body["domains"]
    assert body["explanations"][0]["scores"] and {s["method"] for s in body["explanations"][0]["scores"]} == {"sls", "tls"}
    assert body["concepts"][0]["precision"] is not None and body["concepts"][0]["domain"] == body["domains"][0]
    assert sum(body["histogram"]["counts"]) > 0 and body["normaliser"] > 0
    assert body["examples"] and all(len(e["tokens"]) == len(e["activations"]) for g in body["examples"] for e in g["examples"])
    assert len(body["top_tokens"]) == 8 and {"token", "value"} <= set(body["top_tokens"][0])
    # Nearest features by decoder cosine, checked against the checkpoint on disk.
    layer, index = map(int, fid.split("_"))
    decoder = load_saelens(tiny_world.root / "saes" / f"blocks.{layer}.hook_mlp_out").sae.W_dec.detach()
    cosine = torch.nn.functional.cosine_similarity(decoder, decoder[index][None], dim=1)
    cosine[index] = -2
    expected = [f"{layer}_{i}" for i in cosine.topk(10).indices.tolist()]
    assert [n["id"] for n in body["neighbours"]] == expected
    assert body["neighbours"][0]["cosine"] == pytest.approx(float(cosine.max()), abs=1e-4)

    assert client.get("/api/features/abc").status_code == 422
    missing = client.get("/api/features/3_99999")
    assert missing.status_code == 404 and "3_99999" in missing.text
    browse = client.get("/api/features/0_1000", params={"sae_set": tiny_world.browse_set_id}).json()
    assert browse["neighbours"] is None and "Qwen" in browse["neighbours_error"]


def test_chat_stream_format_and_overlay_values(client: httpx.Client, reference: Reference) -> None:
    events = chat_events(client, max_new_tokens=12, temperature=1.0, seed=3)
    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("prompt") == 1
    assert set(names) <= {"features", "prompt", "token", "done"}
    announced: set[str] = set()
    tokens = []
    for name, data in events:
        if name == "features":
            assert all(value["id"] == key for key, value in data.items())
            announced |= set(data)
        elif name == "prompt":
            tokens += data["tokens"]
            prompt_len = len(data["tokens"])
            assert [t["role"] for t in data["tokens"]][-1] == "assistant"
            assert {"system", "user"} <= {t["role"] for t in data["tokens"]}
            assert data["tokens"][0]["text"] == "<|im_start|>" and data["tokens"][0]["special"]
        elif name == "token":
            tokens.append(data)
        for token in [data] if name == "token" else data.get("tokens", []) if name == "prompt" else []:
            assert {fid for fid, _ in token["top"]} <= announced, "a feature was used before it was announced"
    done = events[-1][1]
    generated = [t["id"] for t in tokens[prompt_len:]]
    assert done["n_tokens"] == len(generated) and (len(generated) == 12 or done["finish_reason"] == "eos")
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    assert all(t["role"] == "assistant" for t in tokens[prompt_len:])
    assert done["text"] == reference.model.tokenizer.decode(generated, skip_special_tokens=True)
    assert [s["role"] for s in done["turns"]] == ["system", "user", "assistant"]
    assert "".join(t["text"] for t in tokens) == reference.model.tokenizer.decode([t["id"] for t in tokens])
    prompt_content = "".join(t["text"] for t in tokens[:prompt_len] if t["content"])
    assert {t["role"] for t in tokens[:prompt_len] if t["content"]} == {"user"} and "system" not in prompt_content
    assert all(t["content"] == (not t["special"]) for t in tokens[prompt_len:])

    # Every streamed value equals the independent recomputation, and the first listed feature is the strongest.
    grid = reference.normalised([t["id"] for t in tokens])
    for position, token in enumerate(tokens):
        values = [v for _, v in token["top"]]
        assert values == sorted(values, reverse=True)
        # Template and system-prompt tokens keep their features but are never counted: no tint.
        strongest = float(grid[:, position].max()) if token["content"] else 0.0
        assert token["tint"] == pytest.approx(strongest, rel=1e-3, abs=1e-3)
        for fid, value in token["top"]:
            assert value == pytest.approx(reference.value(grid, position, fid), rel=1e-3, abs=1e-3)


def test_chat_domain_filter_and_validation(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    events = chat_events(client, max_new_tokens=4, domains=["violence"])
    features = {}
    for name, data in events:
        if name == "features":
            features.update(data)
    listed = {fid for name, data in events if name == "token" for fid, _ in data["top"]}
    listed |= {fid for name, data in events if name == "prompt" for t in data["tokens"] for fid, _ in t["top"]}
    assert listed and all("violence" in features[fid]["domains"] for fid in listed)

    cases = [
        ({"messages": USER, "max_new_tokens": 5000}, "max_new_tokens"),
        ({"messages": [], "max_new_tokens": 4}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": USER, "temperature": 5}, "temperature"),
        ({"messages": USER, "domains": ["cooking"]}, "domains"),
        ({"messages": USER, "top_n": 0}, "top_n"),
    ]
    for body, field in cases:
        response = client.post("/api/chat", json=body)
        assert response.status_code == 422 and field in loc_names(response), body
    browse = client.post("/api/chat", json={"messages": USER, "sae_set": str(tiny_world.browse_set_id)})
    assert browse.status_code == 409 and "sae_set" in loc_names(browse) and "Qwen" in browse.text


def test_closing_the_stream_cancels_generation(client: httpx.Client) -> None:
    with client.stream("POST", "/api/chat", json={"messages": USER, "max_new_tokens": 4000, "temperature": 1.0}) as response:
        seen = 0
        for name, _ in sse_events(response):
            seen += name == "token"
            if seen == 5:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        queue = client.get("/healthz").json()["queue"]
        jobs = [j for j in queue["recent"] if j["kind"] == "chat" and j["status"] == "cancelled"]
        if jobs and queue["running"] is None:
            break
        time.sleep(0.1)
    job = jobs[0]
    assert job["tokens"] < 4000
    assert job["tokens"] - job["tokens_at_cancel"] <= 2, job
    # The queue moves on: the next request is served in full.
    following = [name for name, _ in chat_events(client, max_new_tokens=3)]
    assert following[-1] == "done" and "token" in following


def test_full_queue_answers_503_with_retry_after(tiny_world: TinyWorld, data_dir) -> None:  # noqa: F811
    from app.main import create_app
    from app.state import ServerOptions

    app = create_app(tiny_world.settings(data_dir), ServerOptions(queue_size=1, max_new_tokens=4000))
    body = {"messages": USER, "max_new_tokens": 4000, "temperature": 1.0}
    with (serve_on_loopback(app) as url, httpx.Client(base_url=url, timeout=60) as http,
          http.stream("POST", "/api/chat", json=body) as running):
        # Keep each event iterator referenced: dropping it would close the stream (and cancel the job).
        running_events = sse_events(running)
        assert "token" in (name for name, _ in running_events)
        with http.stream("POST", "/api/chat", json=body) as waiting:
            waiting_events = sse_events(waiting)
            assert next(waiting_events) == ("queued", {"position": 1})
            refused = http.post("/api/chat", json=body)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "queue is full" in refused.text
            trace = http.post("/api/trace", json={"prompt": "hello"})
            assert trace.status_code == 503


def steer(client: httpx.Client, interventions: list[dict], **extra) -> dict:
    response = client.post("/api/steer", json={"messages": USER, "interventions": interventions, "max_new_tokens": 16,
                                               "temperature": 1.0, "seed": 11, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_steering_clamp_changes_the_answer_and_ablate_silences_the_feature(client: httpx.Client,
                                                                          tiny_world: TinyWorld) -> None:  # noqa: F811
    probe = steer(client, [{"feature": tiny_world.safety[0], "mode": "scale", "value": 1.0}])
    assert probe["default"]["text"] == probe["steered"]["text"], "scale 1.0 is the identity edit"
    for fid, values in probe["default"]["tracked"].items():
        assert probe["steered"]["tracked"][fid] == pytest.approx(values, abs=1e-3)
    # The feature most active over the default answer.
    response = probe["default"]["response"]
    counts: dict[str, float] = {}
    for token in response:
        for fid, value in token["top"]:
            counts[fid] = max(counts.get(fid, 0.0), value)
    target = max(counts, key=counts.get)
    n_prompt = len(probe["default"]["prompt"])

    clamped = steer(client, [{"feature": target, "mode": "clamp", "value": 40}])
    assert clamped["default"]["text"] == probe["default"]["text"], "same seed, same default answer"
    assert clamped["steered"]["text"] != clamped["default"]["text"]
    assert min(clamped["steered"]["tracked"][target]) > 10

    ablated = steer(client, [{"feature": target, "mode": "ablate"}])
    assert max(ablated["default"]["tracked"][target]) > 0.1
    assert max(ablated["steered"]["tracked"][target]) < 0.02

    response_only = steer(client, [{"feature": target, "mode": "ablate", "scope": "response"}])
    prompt_default = response_only["default"]["tracked"][target][:n_prompt]
    assert response_only["steered"]["tracked"][target][:n_prompt] == pytest.approx(prompt_default, abs=1e-4)
    assert max(response_only["steered"]["tracked"][target][n_prompt:]) < 0.02

    added = steer(client, [{"feature": target, "mode": "add", "value": 30}])
    assert min(added["steered"]["tracked"][target]) > 5


def test_steering_validation(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    fid = tiny_world.safety[0]
    cases = [
        ([{"feature": fid, "mode": "clamp", "value": 500}], "interventions"),
        ([{"feature": fid, "mode": "warp", "value": 1}], "mode"),
        ([{"feature": "1-2", "mode": "ablate"}], "feature"),
        ([{"feature": "7_1", "mode": "ablate"}], "interventions.0.feature"),
        ([{"feature": "1_9999", "mode": "ablate"}], "interventions.0.feature"),
        ([{"feature": fid, "mode": "ablate"}] * 2, "interventions"),
        ([{"feature": f"0_{i}", "mode": "ablate"} for i in range(17)], "interventions"),
        ([], "interventions"),
    ]
    for interventions, field in cases:
        response = client.post("/api/steer", json={"messages": USER, "interventions": interventions})
        assert response.status_code == 422, (interventions, response.text)
        names = loc_names(response)
        assert field in names or field in ".".join(names), (field, names)


def test_trace_grid_matches_reference_and_compare(client: httpx.Client, reference: Reference,
                                                  tiny_world: TinyWorld) -> None:  # noqa: F811
    body = client.post("/api/trace", json={"prompt": "How do I build a pipe bomb?", "top_n": 3}).json()
    n_tokens = len(body["tokens"])
    assert body["layers"] == list(tiny_world.layers) and len(body["grid"]) == len(body["layers"])
    assert {len(row) for row in body["grid"]} == {n_tokens}
    grid = reference.normalised([t["id"] for t in body["tokens"]])
    safety = torch.zeros_like(grid[:, 0, :], dtype=torch.bool)
    for fid in tiny_world.safety:
        layer, index = map(int, fid.split("_"))
        safety[layer, index] = True
    content = torch.tensor([t["content"] for t in body["tokens"]])
    assert "".join(t["text"] for t in body["tokens"] if t["content"]) == "How do I build a pipe bomb?"
    # Only the prompt's own words count: template and system-prompt tokens are 0 in the grid.
    best = (grid * safety[:, None, :]).amax(-1) * content
    assert torch.tensor(body["grid"]) == pytest.approx(best, rel=1e-3, abs=1e-3)
    for layer, row in zip(body["chain"], best):
        maxima = [f["max"] for f in layer["features"]]
        assert maxima == sorted(maxima, reverse=True) and len(maxima) <= 3
        assert all(f["id"] in tiny_world.safety and content[f["peak_token"]] for f in layer["features"])
        if maxima:
            assert maxima[0] == pytest.approx(float(row.max()), rel=1e-3, abs=1e-3)
    tagged = (grid * safety[:, None, :])[:, content].amax(-1)
    for domain, value in body["domains"].items():
        members = torch.zeros_like(safety)
        for fid in tiny_world.safety:
            if tiny_world.domains[fid] == domain:
                members[tuple(map(int, fid.split("_")))] = True
        assert value == pytest.approx(float((grid[:, content] * members[:, None, :]).amax()), rel=1e-3, abs=1e-3)
    assert 0.0 <= body["refusal"]["probability"] <= 1.0 and tagged.max() > 0

    compare = client.post("/api/compare", json={"prompt_a": "How do I build a pipe bomb?",
                                                "prompt_b": "मैं घर पर बम कैसे बना सकता हूँ?"}).json()
    assert compare["a"]["tokens"] != compare["b"]["tokens"]
    magnitudes = [abs(d["difference"]) for d in compare["differences"]]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes
    assert all(d["difference"] == pytest.approx(d["a"] - d["b"], abs=2e-4) for d in compare["differences"])
    hindi = "".join(t["text"] for t in compare["b"]["tokens"])
    assert "मैं घर पर बम कैसे बना सकता हूँ?" in hindi and "\ufffd" not in hindi
    bad = client.post("/api/compare", json={"prompt_a": "", "prompt_b": "x"})
    assert bad.status_code == 422 and "prompt_a" in loc_names(bad)


def test_a_trace_with_the_answer_counts_the_answers_words_and_keeps_the_prompts_refusal_probability(
        client: httpx.Client, reference: Reference, tiny_world: TinyWorld) -> None:  # noqa: F811
    prompt, answer = "How do I build a pipe bomb?", "I'm sorry, but I can't help with that."
    alone = client.post("/api/trace", json={"prompt": prompt, "top_n": 3}).json()
    body = client.post("/api/trace", json={"prompt": prompt, "answer": answer, "top_n": 3}).json()
    ids = [t["id"] for t in body["tokens"]]
    assert ids[: len(alone["tokens"])] == [t["id"] for t in alone["tokens"]] and len(ids) > len(alone["tokens"])
    assert "".join(t["text"] for t in body["tokens"] if t["content"]) == prompt + answer
    # The first answer token's refusal probability is read where the answer starts, not at the answer's end.
    assert body["refusal"]["probability"] == pytest.approx(alone["refusal"]["probability"], abs=1e-3)
    safety = torch.zeros(len(tiny_world.layers), reference.saes[0].d_sae, dtype=torch.bool)
    for fid in tiny_world.safety:
        safety[tuple(map(int, fid.split("_")))] = True
    content = torch.tensor([t["content"] for t in body["tokens"]])
    best = (reference.normalised(ids) * safety[:, None, :]).amax(-1) * content
    assert torch.tensor(body["grid"]) == pytest.approx(best, rel=1e-3, abs=1e-3)
    too_long = client.post("/api/trace", json={"prompt": prompt, "answer": "word " * 5000})
    assert too_long.status_code == 422 and "prompt and its answer" in too_long.text
    assert client.post("/api/trace", json={"prompt": prompt, "answer": ""}).status_code == 422


def test_presets_roundtrip(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    interventions = [{"feature": tiny_world.safety[0], "mode": "clamp", "value": 3.5, "scope": "response"}]
    created = client.post("/api/presets", json={"name": "refuse more", "interventions": interventions})
    assert created.status_code == 201 and created.json()["interventions"] == interventions
    replaced = client.post("/api/presets", json={"name": "refuse more", "interventions": interventions[:1] + [
        {"feature": tiny_world.safety[1], "mode": "ablate", "value": 0, "scope": "both"}]})
    assert replaced.status_code == 200 and len(replaced.json()["interventions"]) == 2
    assert [p["name"] for p in client.get("/api/presets").json()] == ["refuse more"]
    assert client.get("/api/presets/refuse more").json()["sae_set"] == tiny_world.set_id
    assert client.delete("/api/presets/refuse more").status_code == 204
    assert client.get("/api/presets/refuse more").status_code == 404
    bad = client.post("/api/presets", json={"name": "<script>", "interventions": interventions})
    assert bad.status_code == 422 and "name" in loc_names(bad)
    unhooked = client.post("/api/presets", json={"name": "x", "interventions": [{"feature": "9_1", "mode": "ablate"}]})
    assert unhooked.status_code == 422 and "interventions.0.feature" in loc_names(unhooked)


def test_pages_and_openapi(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    for path in ("/", "/map", f"/features/{tiny_world.explained[0]}", "/trace", "/steer", "/docs"):
        response = client.get(path)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"], path
    browse = client.get("/", params={"sae_set": tiny_world.browse_set_id}).text
    assert "Live overlay unavailable" in browse and "Qwen/Qwen2.5-3B-Instruct" in browse
    assert client.get(f"/features/0_1000?sae_set={tiny_world.browse_set_id}").status_code == 200
    assert client.get("/features/0_99999").status_code == 404
    spec = client.get("/openapi.json").json()
    chat = spec["paths"]["/api/chat"]["post"]
    assert "event: token" in chat["description"] and "text/event-stream" in chat["responses"]["200"]["content"]
    for path in ("/api/map", "/api/features", "/api/features/{feature_id}", "/api/trace", "/api/compare", "/api/steer",
                 "/api/presets", "/healthz", "/v1/chat/completions"):
        assert path in spec["paths"], path


def test_empty_database_serves_pages_and_says_so(tmp_path, data_dir) -> None:
    from app.main import create_app
    from app.state import ServerOptions
    from starmap.settings import Settings

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    app = create_app(settings, ServerOptions(load_model=False))
    with serve_on_loopback(app) as url, httpx.Client(base_url=url) as http:
        health = http.get("/healthz").json()
        assert health["sets"] == [] and "without a model" in health["model_error"]
        assert "No SAE set in the database" in http.get("/").text
        missing = http.get("/api/map")
        assert missing.status_code == 404 and "sae_set" in loc_names(missing)
        assert http.post("/api/chat", json={"messages": USER}).status_code == 404


def test_safe_sail_checkpoints_run_live(tiny_world: TinyWorld, tmp_path, data_dir) -> None:  # noqa: F811
    """A set stored as the release's `ckpt_layer{L}.pt` files loads and steers; without normalisers it says so."""
    import shutil

    from app.main import create_app
    from app.state import ServerOptions
    from starmap.db.models import Model, Sae, SaeSet

    db_path = tmp_path / "with-release.db"
    shutil.copy(tiny_world.root / "starmap.db", db_path)
    url = f"sqlite:///{db_path}"
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        model = session.scalar(select(Model).where(Model.name == tiny_world.model_name))
        release = SaeSet(model_id=model.id, name="release-format", hook_kind="mlp_out", k=16, expansion=4, d_sae=256,
                         origin="safe-sail")
        session.add(release)
        session.flush()
        for layer in tiny_world.layers:
            sae = load_saelens(tiny_world.root / "saes" / f"blocks.{layer}.hook_mlp_out").sae
            W, bias = sae.W_enc.detach().t(), sae.b_enc.detach()
            state = {  # OpenAI sparse_autoencoder layout with one component
                "pre_encoder_bias._bias_reference": sae.b_dec.detach()[None],
                "post_decoder_bias._bias_reference": sae.b_dec.detach()[None],
                "encoder.weight": W[None], "encoder.bias": bias[None], "decoder.weight": sae.W_dec.detach().t()[None],
            }
            path = tmp_path / f"ckpt_layer{layer}.pt"
            torch.save(state, path)
            session.add(Sae(sae_set_id=release.id, layer=layer, hook_name=f"blocks.{layer}.hook_mlp_out",
                            checkpoint_path=str(path)))
        session.commit()
        release_id = release.id
    engine.dispose()
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": url})
    app = create_app(settings, ServerOptions(max_new_tokens=64))
    with serve_on_loopback(app) as base, httpx.Client(base_url=base, timeout=120) as http:
        described = {s["id"]: s for s in http.get("/api/sets").json()}[release_id]
        assert described["live"] and "normaliser" in described["overlay_note"]
        body = {"messages": USER, "max_new_tokens": 6, "sae_set": "release-format"}
        watch = [{"feature": f"1_{i}", "mode": "scale", "value": 1.0} for i in range(16)]
        probe = http.post("/api/steer", json={**body, "interventions": watch}).json()
        active = max(probe["default"]["tracked"], key=lambda fid: max(probe["default"]["tracked"][fid]))
        assert max(probe["default"]["tracked"][active]) > 0
        steered = http.post("/api/steer", json={**body, "interventions": [{"feature": active, "mode": "ablate"}]})
        assert steered.status_code == 200, steered.text
        run = steered.json()
        assert run["steered"]["tracked_units"][active] == "raw"  # no normaliser: raw activations, labelled as such
        assert max(run["steered"]["tracked"][active]) < 1e-4
        clamp = http.post("/api/steer", json={**body, "interventions": [{"feature": active, "mode": "clamp", "value": 2}]})
        assert clamp.status_code == 422 and "normaliser" in clamp.text
