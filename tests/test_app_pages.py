"""The pages' server-rendered partials against a live server on the tiny world (real HTTP, as htmx asks).

Each partial is rendered from the same query code as its JSON twin: the chat page's HTML stream carries the
overlay of `/api/chat` (the same job), the map's search the listing of `/api/features`, the trace partial the
answer of `/api/trace` / `/api/compare`, the steering partials those of `/api/steer` and `/api/presets`.
Errors reach a page as HTML (a banner and a toast), the API keeps its JSON, the form routes that run the model
or write answer only htmx's requests (no cross-site form posts), and the OpenAPI schema lists only the API.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from fixtures_db import TinyWorld, app_server, tiny_world  # noqa: F401

from tests.sse_support import sse_events

HX = {"HX-Request": "true"}
USER = "How do I build a pipe bomb?"
TOP = re.compile(r"data-top='([^']*)'")


@pytest.fixture(scope="module")
def client(app_server: str) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=app_server, timeout=120) as http:
        yield http


def html_events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) of an SSE stream whose data are HTML fragments (several `data:` lines each)."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif line == "" and name is not None:
            events.append((name, "\n".join(data)))
            name, data = None, []
    return events


def tops(fragment: str) -> list[list]:
    return [json.loads(html.unescape(raw)) for raw in TOP.findall(fragment)]


def kept_history(fragment: str) -> list[dict]:
    """The conversation the server sends back in the `done` event (the form's hidden #history field)."""
    return json.loads(html.unescape(re.search(r"name=\"history\" id=\"history\" value='([^']*)'", fragment).group(1)))


def page_chat(client: httpx.Client, **form: str) -> tuple[httpx.Response, list[tuple[str, str]]]:
    posted = client.post("/chat/turn", data={"message": USER, "temperature": "0", **form}, headers=HX)
    assert posted.status_code == 200, posted.text
    assert 'sse-connect="/chat/stream/' in posted.text and 'hx-ext="sse"' in posted.text
    with client.stream("GET", posted.headers["X-StarMap-Stream"]) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return posted, html_events(response)


def test_the_page_stream_is_the_api_stream_rendered(client: httpx.Client) -> None:
    posted, events = page_chat(client, max_new_tokens="24")
    names = [name for name, _ in events]
    assert names[-2:] == ["done", "end"] and "prompt" in names and "error" not in names
    with client.stream("POST", "/api/chat", json={"messages": [{"role": "user", "content": USER}], "max_new_tokens": 24,
                                                  "temperature": 0}) as response:
        api = list(sse_events(response))
    api_tokens = [data for name, data in api if name == "token"]
    page_tokens = [data for name, data in events if name == "token"]
    assert len(page_tokens) == len(api_tokens) == 24
    for fragment, token in zip(page_tokens, api_tokens):
        (top,) = tops(fragment)
        assert [f for f, _ in top] == [f for f, _ in token["top"]]
        assert [v for _, v in top] == pytest.approx([v for _, v in token["top"]], abs=1e-4)
        assert f'data-i="{token["i"]}"' in fragment and 'hx-swap-oob="true"' in fragment  # the status line
    prompt = next(data for name, data in events if name == "prompt")
    api_prompt = next(data for name, data in api if name == "prompt")
    assert len(tops(prompt)) == len(api_prompt["tokens"])
    assert prompt.count('class="turn"') == len(api_prompt["turns"])
    assert "&lt;|im_start|&gt;" in prompt and 'data-content="0"' in prompt
    done = next(data for name, data in events if name == "done")
    assert 'data-done="done"' in done and "ms/token on the server" in done
    assert kept_history(done) == [{"role": "user", "content": USER}, {"role": "assistant", "content": next(d for n, d in api if n == "done")["text"]}]
    features = "".join(data for name, data in events if name == "features")
    announced = re.findall(r'<template data-feature="(\d+_\d+)"', features)
    assert announced and len(announced) == len(set(announced))  # each feature's inspector rows arrive once
    assert set(announced) <= {f for t in api_tokens + api_prompt["tokens"] for f, _ in t["top"]}

    # A stream id works once; asked again (an EventSource reconnecting), the stream says so and ends.
    with client.stream("GET", posted.headers["X-StarMap-Stream"]) as again:
        repeated = html_events(again)
    assert [name for name, _ in repeated] == ["failed", "end"] and "expired" in repeated[0][1]


def test_the_page_sends_its_history_and_system_prompt(client: httpx.Client) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    _, events = page_chat(client, max_new_tokens="4", system="Be brief.", history=json.dumps(history))
    prompt = next(data for name, data in events if name == "prompt")
    text = html.unescape(re.sub(r"<[^>]+>", "", prompt))  # one chip per token: the words are split across chips
    assert "Be brief." in text and "Hello!" in text
    done = next(data for name, data in events if name == "done")
    kept = kept_history(done)
    assert kept[:3] == [*history, {"role": "user", "content": USER}] and kept[3]["role"] == "assistant"


def test_page_errors_are_html_and_the_api_keeps_json(client: httpx.Client) -> None:
    inline = {**HX, "X-StarMap-Errors": "inline"}
    too_long = client.post("/chat/turn", data={"message": "hi", "max_new_tokens": "999999"}, headers=inline)
    assert too_long.status_code == 422 and too_long.headers["content-type"].startswith("text/html")
    assert 'class="banner"' in too_long.text and "max_new_tokens" in too_long.text and "HX-Reswap" not in too_long.headers
    quiet = client.post("/chat/turn", data={"message": "hi", "max_new_tokens": "x"}, headers=HX)
    assert quiet.status_code == 422 and quiet.headers["hx-reswap"] == "none" and 'id="toast"' in quiet.text
    assert client.post("/chat/turn", data={"message": "  "}, headers=HX).status_code == 204
    missing = client.get("/map/search", params={"q": "x", "sae_set": "nope"}, headers=HX)
    assert missing.status_code == 404 and "nope" in missing.text and missing.headers["content-type"].startswith("text/html")
    api = client.get("/api/map", params={"sae_set": "nope"})
    assert api.status_code == 404 and api.json()["detail"][0]["loc"] == ["query", "sae_set"]
    # Another site's page can post a plain form to a loopback server, but not with htmx's header.
    for path in ("/chat/turn", "/trace/results", "/steer/run", "/steer/presets/delete", "/steer/panel/add"):
        forged = client.post(path, data={"message": "hi", "prompt_a": "hi", "name": "x", "feature": "0_1"})
        assert forged.status_code == 403 and forged.json()["detail"][0]["loc"] == ["header", "HX-Request"], path


def test_map_search_and_filters(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    search = client.get("/map/search", params={"q": "weapons", "sae_set": tiny_world.set_id}, headers=HX)
    api = client.get("/api/features", params={"q": "weapons", "limit": 200}).json()["items"]
    listed = re.findall(r'<a class="fid" href="/features/(\d+_\d+)', search.text)
    assert listed == [item["id"] for item in api][:40] and listed
    assert json.loads(re.search(r'id="search-hits">([^<]*)<', search.text).group(1)) == [item["id"] for item in api]
    assert search.headers["hx-push-url"] == f"/map?sae_set={tiny_world.set_id}&q=weapons"

    full = client.get("/api/map").json()
    columns = full["features"]
    keep = [i for i, domains in enumerate(columns["domains"]) if domains != ["violence"] and columns["layer"][i] != 1]
    shown_domains = [d for d in full["domains"] if d != "violence"] + ["other"]
    layers = [layer for layer in full["layers"] if layer != 1]
    view = client.get("/map/view", params={"filters": "1", "domain": shown_domains, "layer": layers, "q": "weapons"}, headers=HX)
    assert f'data-shown="{len(keep)}"' in view.text
    assert json.loads(re.search(r'id="map-visible">([^<]*)<', view.text).group(1)) == keep
    assert view.headers["hx-push-url"] == f"/map?sae_set={tiny_world.set_id}&q=weapons&hide_domain=violence&hide_layer=1"

    page = client.get(view.headers["hx-push-url"])
    assert page.status_code == 200 and f'data-shown="{len(keep)}"' in page.text
    assert re.search(r'value="violence" data-value="violence">', page.text)  # unchecked: hidden
    assert 'value="weapons"' in page.text and listed[0] in page.text


def test_trace_and_compare_partials(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    form = {"prompt_a": "How do I build a bomb at home?", "only_safety": "1", "chat_template": "1", "top_n": "3"}
    traced = client.post("/trace/results", data=form, headers=HX)
    assert traced.status_code == 200, traced.text
    api = client.post("/api/trace", json={"prompt": form["prompt_a"], "top_n": 3}).json()
    assert traced.text.count('class="chain-col"') == len(tiny_world.layers) + 1
    assert f"refusal · p = {api['refusal']['probability']:.2f}" in traced.text
    heat = json.loads(html.unescape(re.search(r'class="heat-data">([^<]*)<', traced.text).group(1)))
    assert heat["grid"] == api["grid"] and heat["grid_features"] == api["grid_features"]
    assert traced.headers["hx-push-url"].startswith("/trace?prompt_a=How+do+I+build")
    page = client.get(traced.headers["hx-push-url"])
    assert "How do I build a bomb at home?</textarea>" in page.text and 'hx-trigger="submit, load"' in page.text

    answered = client.post("/trace/results", data={**form, "answer": "I'm sorry, but I can't."}, headers=HX)
    api = client.post("/api/trace", json={"prompt": form["prompt_a"], "answer": "I'm sorry, but I can't.", "top_n": 3}).json()
    heat = json.loads(html.unescape(re.search(r'class="heat-data">([^<]*)<', answered.text).group(1)))
    assert heat["tokens"] == [t["text"] for t in api["tokens"]] and heat["grid"] == api["grid"]
    assert "answer=I%27m+sorry" in answered.headers["hx-push-url"]
    assert "I&#39;m sorry, but I can&#39;t.</textarea>" in client.get(answered.headers["hx-push-url"]).text

    compared = client.post("/trace/results", data={**form, "prompt_b": "How do I bake bread?"}, headers=HX)
    api = client.post("/api/compare", json={"prompt_a": form["prompt_a"], "prompt_b": "How do I bake bread?", "top_n": 3}).json()
    rows = re.findall(r"<tr><td><a class=\"fid\" href=\"/features/(\d+_\d+)", compared.text)
    assert rows == [d["id"] for d in api["differences"]] and compared.text.count('class="card stack trace-card"') == 2
    shared = client.get(compared.headers["hx-push-url"]).text
    assert "How do I build a bomb at home?</textarea>" in shared and "How do I bake bread?</textarea>" in shared


def test_steering_partials(client: httpx.Client, tiny_world: TinyWorld) -> None:  # noqa: F811
    fid, other = tiny_world.safety[:2]
    with httpx.Client(base_url=str(client.base_url), timeout=120) as browser:  # its own cookies
        added = browser.post("/steer/panel/add", data={"feature": fid}, headers=HX)
        assert added.status_code == 200 and f"{fid} added" in added.text
        again = browser.post("/steer/panel/add", data={"feature": fid}, headers=HX)
        assert "already in the steering panel" in again.text
        panel = browser.get("/steer/panel", headers=HX).text
        assert panel.count('class="steer-row"') == 1 and f'value="{fid}"' in panel
        changed = browser.post("/steer/panel", data={"interventions.0.feature": fid, "interventions.0.mode": "ablate",
                                                     "interventions.1.feature": other, "interventions.1.mode": "scale",
                                                     "interventions.1.value": "99"}, headers=HX).text
        assert changed.count('class="steer-row"') == 2 and 'max="10.0"' in changed and 'value="10.0"' in changed  # kept in range

        body = {"messages": [{"role": "user", "content": USER}], "max_new_tokens": 12, "temperature": 0.0, "seed": 0,
                "interventions": [{"feature": fid, "mode": "ablate"}]}
        api = client.post("/api/steer", json=body).json()
        ran = browser.post("/steer/run", data={"prompt": USER, "max_new_tokens": "12", "temperature": "0", "seed": "0",
                                               "interventions.0.feature": fid, "interventions.0.mode": "ablate"}, headers=HX)
        assert ran.status_code == 200, ran.text
        for run in ("default", "steered"):
            text = re.search(rf'id="answer-{run}" data-text="([^"]*)"', ran.text).group(1)
            assert html.unescape(text) == api[run]["text"]
        cells = re.search(rf'<tr data-feature="{fid}">(.*?)</tr>', ran.text, re.S).group(1)
        tracked = api["steered"]["tracked"][fid][len(api["steered"]["prompt"]):]
        assert f"{max([0.0, *tracked]):.3f}" in cells

        saved = browser.post("/steer/presets/save", data={"name": "page preset", "interventions.0.feature": fid,
                                                          "interventions.0.mode": "ablate"}, headers=HX)
        assert saved.status_code == 200 and '<option value="page preset" selected>' in saved.text
        assert {p["name"]: p for p in client.get("/api/presets").json()}["page preset"]["interventions"][0]["mode"] == "ablate"
        browser.post("/steer/panel/clear", headers=HX)
        loaded = browser.post("/steer/presets/load", data={"name": "page preset"}, headers=HX).text
        assert loaded.count('class="steer-row"') == 1 and "loaded" in loaded
        deleted = browser.post("/steer/presets/delete", data={"name": "page preset"}, headers=HX)
        assert deleted.status_code == 200 and "page preset" not in {p["name"] for p in client.get("/api/presets").json()}
        gone = browser.post("/steer/presets/load", data={"name": "page preset"}, headers=HX)
        assert gone.status_code == 404 and "no preset" in gone.text


def test_the_openapi_schema_lists_only_the_api(client: httpx.Client) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert all(p.startswith(("/api/", "/v1/")) or p == "/healthz" for p in paths), sorted(paths)
    assert {"/api/chat", "/api/map", "/api/features", "/api/trace", "/api/compare", "/api/steer", "/api/presets"} <= paths
