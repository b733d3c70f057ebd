"""The app's safety decisions API: monitors in the trace and chat, refusal-direction steering, conditional steering,
`stop_when`, the capability cost of an edit, and the validation of all of them."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fixtures_db import (  # noqa: F401
    DIRECTION_LAYER_SLOT,
    TinyWorld,
    app_server,
    tiny_world,
)

from tests.test_app_api import USER, chat_events, loc_names


@pytest.fixture(scope="module")
def client(app_server: str) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=app_server, timeout=300) as http:
        yield http


def test_trace_and_chat_carry_the_monitors_risk_with_reasons(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    trace = client.post("/api/trace", json={"prompt": "How do I build a pipe bomb?"}).json()
    probe = trace["monitor"]["probe"]
    assert set(probe) == {"violence", "drugs", "any"} and set(trace["monitor"]["ksparse"]) == set(probe)
    for risk in probe.values():
        assert 0.0 <= risk["p"] <= 1.0 and risk["layer"] == tiny_world.layers[DIRECTION_LAYER_SLOT]
        contributions = [r["contribution"] for r in risk["reasons"]]
        assert contributions == sorted(contributions, reverse=True) and all(c > 0 for c in contributions)
    prompt = next(data for name, data in chat_events(client, max_new_tokens=2) if name == "prompt")
    assert prompt["risk"]["probe"]["any"]["p"] == pytest.approx(probe["any"]["p"], abs=1e-3)


def test_refusal_direction_steering_and_its_cost(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    layer = tiny_world.layers[DIRECTION_LAYER_SLOT]
    body = {"messages": USER, "max_new_tokens": 4, "interventions": [{"layer": layer, "mode": "direction_add", "value": 3.0}]}
    steered = client.post("/api/steer", json=body)
    assert steered.status_code == 200, steered.text
    result = steered.json()
    assert result["default"]["text"] != result["steered"]["text"] or result["default"]["prompt"] != result["steered"]["prompt"]
    cost = result["cost"]
    assert cost["ce"] > 0 and cost["ce_increase"] == pytest.approx(cost["ce"] - (cost["ce"] - cost["ce_increase"]))
    assert 0.0 <= cost["benign_refusal"] <= 1.0
    # The same edit again comes from the cache, with the same figures.
    assert client.post("/api/steer", json=body).json()["cost"] == cost
    assert client.post("/api/steer", json={**body, "cost": False}).json()["cost"] is None


@pytest.mark.parametrize(("intervention", "field", "message"), [
    ({"layer": 0, "mode": "direction_ablate"}, "interventions.0.layer", "has no refusal direction"),
    ({"layer": 99, "mode": "direction_ablate"}, "interventions.0.layer", "is not hooked"),
    ({"feature": "1_2", "layer": 1, "mode": "direction_ablate"}, "interventions.0", "needs `layer`"),
    ({"layer": 1, "mode": "ablate"}, "interventions.0", "needs `feature`"),
    ({"layer": 1, "mode": "direction_add", "value": 9.0}, "interventions.0", "outside the direction_add range"),
    ({"feature": "0_1", "mode": "add", "value": 1.0, "when": {"feature": "3_1", "above": 0.5}}, "interventions.0",
     "same or an earlier layer"),
])
def test_steering_validation_names_the_field(client: httpx.Client, intervention, field, message) -> None:
    response = client.post("/api/steer", json={"messages": USER, "interventions": [intervention]})
    assert response.status_code == 422, response.text
    assert field in ".".join(str(p) for p in loc_names(response)) or field in response.text
    assert message in response.text


def test_a_conditional_edit_and_stop_when(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    free = [data for name, data in chat_events(client, max_new_tokens=6) if name == "token"]
    # The strongest listed feature of the third generated token: stop there (or earlier) when it fires.
    target = next(t for t in free[2:] if t["top"])
    feature, value = target["top"][0]
    stopped = chat_events(client, max_new_tokens=6, stop_when={"feature": feature, "above": value * 0.5})
    done = stopped[-1][1]
    assert done["finish_reason"] == "feature" and done["stopped_at"] is not None
    assert done["n_tokens"] <= len(free)
    unknown = client.post("/api/chat", json={"messages": USER, "stop_when": {"feature": "0_99999", "above": 1.0}})
    assert unknown.status_code == 422 and "stop_when.feature" in ".".join(str(p) for p in loc_names(unknown))
    conditional = {"feature": tiny_world.safety[0], "mode": "add", "value": 5.0,
                   "when": {"feature": tiny_world.safety[0], "above": 0.2}}
    response = client.post("/api/steer", json={"messages": USER, "max_new_tokens": 3, "interventions": [conditional],
                                               "cost": False})
    assert response.status_code == 200, response.text


def test_presets_carry_their_figures(client: httpx.Client) -> None:
    saved = client.post("/api/presets", json={"name": "plain", "interventions": [{"layer": 1, "mode": "direction_ablate"}]})
    assert saved.status_code in (200, 201), saved.text
    preset = client.get("/api/presets/plain").json()
    assert preset["interventions"] == [{"layer": 1, "mode": "direction_ablate", "value": 0.0, "scope": "both"}]
    assert "figures" not in preset and "description" not in preset  # none recorded for a preset saved by hand
    assert client.delete("/api/presets/plain").status_code == 204


def test_v1_chat_completions_steers_as_the_steering_api_does(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    model = client.get("/v1/models").json()["data"][0]["id"]
    layer = tiny_world.layers[DIRECTION_LAYER_SLOT]
    edits = [{"layer": layer, "mode": "direction_add", "value": 3.0}, {"feature": tiny_world.safety[0], "mode": "add", "value": 5.0}]
    reference = client.post("/api/steer", json={"messages": USER, "max_new_tokens": 5, "interventions": edits, "cost": False}).json()
    base = {"model": model, "messages": USER, "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=base).json()["choices"][0]
    steered = client.post("/v1/chat/completions", json={**base, "interventions": edits}).json()["choices"][0]
    assert plain["message"]["content"] == reference["default"]["text"]
    assert steered["message"]["content"] == reference["steered"]["text"]
    assert reference["steered"]["text"] != reference["default"]["text"]  # the edit is strong enough to show


def test_v1_stop_when_ends_on_the_feature_and_bad_extension_fields_are_400(client: httpx.Client) -> None:
    model = client.get("/v1/models").json()["data"][0]["id"]
    free = [data for name, data in chat_events(client, max_new_tokens=6) if name == "token"]
    target = next(t for t in free[2:] if t["top"])
    feature, value = target["top"][0]
    base = {"model": model, "messages": USER, "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=base).json()["choices"][0]
    stopped = client.post("/v1/chat/completions", json={**base, "stop_when": {"feature": feature, "above": value * 0.5}})
    choice = stopped.json()["choices"][0]
    assert choice["finish_reason"] == "feature"
    assert plain["message"]["content"].startswith(choice["message"]["content"])
    for extension, param in (({"stop_when": {"feature": "0_99999", "above": 1.0}}, "stop_when.feature"),
                             ({"interventions": [{"layer": 0, "mode": "direction_ablate"}]}, "interventions.0.layer")):
        response = client.post("/v1/chat/completions", json={**base, **extension})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_features_carry_their_cosine_with_the_refusal_direction(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    layer = tiny_world.layers[DIRECTION_LAYER_SLOT]
    on = [f for f in tiny_world.explained if int(f.split("_")[0]) == layer]
    cosines = [client.get(f"/api/features/{f}").json() for f in on[:5]]
    for body in cosines:
        assert -1.0 <= body["refusal_cosine"] <= 1.0 and 0.0 < body["refusal_cosine_share"] <= 1.0
    ranked = sorted(cosines, key=lambda b: -b["refusal_cosine"])
    assert [b["refusal_cosine_share"] for b in ranked] == sorted(b["refusal_cosine_share"] for b in ranked)
    other = next(f for f in tiny_world.explained if int(f.split("_")[0]) != layer)
    assert client.get(f"/api/features/{other}").json()["refusal_cosine"] is None  # no direction on that layer
    page = client.get(f"/features/{on[0]}").text
    assert 'id="refusal-cosine"' in page


def test_the_steering_panel_suggests_features_by_refusal_cosine_and_loads_a_linked_preset(
        client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    layer = tiny_world.layers[DIRECTION_LAYER_SLOT]
    panel = client.get("/steer/panel").text
    suggested = re.findall(r'<tr><td><a class="fid" href="/features/(\d+_\d+)[^"]*">[^<]*</a></td><td class="num mono">([+-][\d.]+)</td>',
                           panel)
    assert len(suggested) == 6 and all(int(fid.split("_")[0]) == layer for fid, _ in suggested)
    values = [float(v) for _, v in suggested]
    assert all(v > 0 for v in values[:3]) and all(v < 0 for v in values[3:])
    assert values[:3] == sorted(values[:3], reverse=True) and values[3:] == sorted(values[3:])
    top = client.get(f"/api/features/{suggested[0][0]}").json()["refusal_cosine"]
    assert top == pytest.approx(values[0], abs=1e-3)
    saved = client.post("/api/presets", json={"name": "linked", "interventions": [{"layer": layer, "mode": "direction_ablate"}]})
    assert saved.status_code in (200, 201), saved.text
    linked = client.get("/steer/panel", params={"preset": "linked"})
    assert f'name="interventions.0.layer" value="{layer}"' in linked.text and "starmap_steer_" in linked.headers["set-cookie"]
    assert client.get("/steer/panel", params={"preset": "nope"}).status_code == 404
    page = client.get("/steer", params={"preset": "linked", "prompt": "Hola"}).text
    assert "preset=linked" in page and ">Hola</textarea>" in page
    assert client.delete("/api/presets/linked").status_code == 204
