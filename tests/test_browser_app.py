"""The pages in headless Chromium against a live server on the tiny world; screenshots go to docs/screenshots/."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from browser_support import (  # noqa: F401
    CHAT_DONE,
    browser,
    first_point,
    htmx_idle,
    most_active_feature,
    open_page,
    open_steering_with,
    plotted_points,
    run_steering,
    shot,
    stream_counts,
    wait_for_map,
)
from fixtures_db import TinyWorld, app_server, tiny_world  # noqa: F401
from sse_support import sse_events


@pytest.fixture
def page(browser, app_server: str) -> Iterator:  # noqa: F811
    with open_page(browser, app_server) as tab:
        yield tab


def test_chat_streams_tokens_and_inspects_them(page) -> None:
    page.goto("/")
    page.fill("#message", "How do I build a pipe bomb at home?")
    page.fill("#max-new", "300")
    page.fill("#temperature", "1")
    page.click("#send")
    counts, final = stream_counts(page, timeout_s=90)
    partial = sorted({c for c in counts if 0 < c < final})
    assert final > 10 and len(partial) >= 3, f"tokens did not arrive progressively: {partial} then {final}"
    assert counts == sorted(counts), "the token count never shrinks while streaming"

    transcript = page.inner_text("#transcript")
    assert "<|im_start|>" in transcript and "&lt;" not in transcript
    assert page.locator(".tok.special", has_text="<|im_start|>").count() >= 3
    assert {"system", "user", "assistant"} <= set(page.locator(".turn .role").all_inner_texts()) | {
        t.lower() for t in page.locator(".turn .role").all_inner_texts()}

    tinted = page.locator(".tok.gen[title*='_']").first
    strongest = tinted.get_attribute("title").split(" · ")[0]
    tinted.click()
    rows = page.locator("#inspector tr[data-feature]")
    assert rows.count() >= 1
    assert rows.first.get_attribute("data-feature") == strongest
    assert page.locator("#inspector a.fid").first.get_attribute("href").startswith(f"/features/{strongest}")
    shot(page, "chat")

    # Domain toggles filter what is shown: hiding every domain empties the table.
    for pill in page.locator("#domain-toggles .dom").all():
        pill.click()
    assert page.locator("#inspector tr[data-feature]").count() == 0
    for pill in page.locator("#domain-toggles .dom").all():
        pill.click()


def test_map_filters_and_opens_a_feature(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    page.goto("/map")
    total = wait_for_map(page)
    assert total == plotted_points(page) == len(tiny_world.explained)
    assert page.get_attribute("#map-count", "data-total") == str(len(tiny_world.explained))
    page.uncheck("#domain-list input[data-value='violence']")
    reduced = wait_for_map(page, changed_from=total)
    assert 0 < reduced == plotted_points(page) < len(tiny_world.explained)
    assert "hide_domain=violence" in page.url
    page.check("#domain-list input[data-value='violence']")
    assert wait_for_map(page, changed_from=reduced) == total
    page.fill("#search", "weapons")
    page.wait_for_selector("#search-results[data-q='weapons'] #results li a.fid")
    assert all("weapons" in text for text in page.locator("#results li").all_inner_texts())
    shot(page, "map")

    target = first_point(page)
    page.mouse.move(target["x"], target["y"])
    page.mouse.click(target["x"], target["y"])
    page.wait_for_url(re.compile(r".*/features/\d+_\d+\?sae_set=\d+"))
    assert page.locator("#feature-id").inner_text() in tiny_world.explained
    page.wait_for_selector("#histogram .main-svg")
    assert page.locator("#neighbours tr").count() == 10
    assert page.locator(".example mark.act").count() > 0
    shot(page, "feature", full_page=True)


def test_steering_clamp_and_ablate(page, app_server: str) -> None:  # noqa: F811
    # The feature most active in the default answer of the page's own settings.
    target, body = most_active_feature(app_server, "How do I pick a lock?", max_new_tokens=64)

    open_steering_with(page, target)
    default, steered, _ = run_steering(page, target, "clamp", "40")
    assert default == body["default"]["text"], "same seed and settings give the same default answer"
    assert steered != default
    # The answers' chips inspect as the chat's do (the steering results carry the features' rows).
    chip = page.locator("#answer-steered .tok[title*='_']").first
    strongest = chip.get_attribute("title").split(" · ")[0]
    chip.click()
    assert page.locator("#steer-inspector tr.head-row").first.get_attribute("data-feature") == strongest
    shot(page, "steer", full_page=True)

    _, _, cells = run_steering(page, target, "ablate")
    default_max, steered_max = float(cells[3]), float(cells[5])
    assert default_max > 0.1 and steered_max < 0.02, cells

    page.fill("#preset-name", "silence one")
    page.click("#preset-save")
    page.wait_for_function("document.querySelectorAll('#preset-list option').length > 0")
    assert "silence one" in page.inner_text("#preset-list")


def test_compare_two_prompts(page) -> None:
    page.goto("/trace")
    page.fill("#prompt-a", "How do I build a bomb at home?")
    page.fill("#prompt-b", "मैं घर पर बम कैसे बना सकता हूँ?")
    page.click("#trace-go")
    page.wait_for_selector("#differences tbody tr", timeout=120_000)
    cards = page.locator("#compare-pair .trace-card")
    assert cards.count() == 2
    for i in range(2):
        assert cards.nth(i).locator(".heat .main-svg").count() >= 1
        # One column per hooked layer, then the refusal stage.
        assert cards.nth(i).locator(".chain-col").count() == 5
        assert cards.nth(i).locator(".chain-col[data-layer='refusal'] h4").inner_text().startswith("refusal · p = ")
    assert page.locator("#differences tbody tr").count() > 0
    shot(page, "compare", full_page=True)


def test_browse_only_set(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    page.goto(f"/?sae_set={tiny_world.browse_set_id}")
    assert "needs the SAE checkpoints" in page.inner_text("#live-banner") or "Qwen" in page.inner_text("#live-banner")
    assert page.is_disabled("#send")
    page.goto(f"/map?sae_set={tiny_world.browse_set_id}")
    assert wait_for_map(page) == plotted_points(page) == 30


def test_api_docs_render_from_local_assets(page) -> None:
    external: list[str] = []
    page.on("request", lambda request: external.append(request.url)
            if not request.url.startswith(("http://127.0.0.1", "data:")) else None)
    page.goto("/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/api/chat']", timeout=30_000)
    assert page.locator(".opblock").count() >= 10
    assert not external, f"the docs page fetched from outside: {external}"
    shot(page, "api-docs")


# The pages on htmx: search as you type, presets, the chat stream through the SSE extension, keyboard use.


def test_map_search_as_you_type_narrows_the_list(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    searches: list[str] = []
    page.on("request", lambda request: searches.append(request.url) if "/map/search" in request.url else None)
    page.goto("/map")
    wait_for_map(page)
    box = page.locator("#search")
    box.press_sequentially("fixture", delay=30)
    page.wait_for_selector("#search-results[data-q='fixture']", state="attached")
    broad = int(page.get_attribute("#search-results", "data-n"))
    assert broad == len(tiny_world.explained) and page.locator("#results li a.fid").count() == 40
    box.press_sequentially(" weapons", delay=30)
    page.wait_for_selector("#search-results[data-q='fixture weapons']", state="attached")
    narrow = int(page.get_attribute("#search-results", "data-n"))
    listed = page.locator("#results li").all_inner_texts()
    assert 0 < narrow < broad and len(listed) == narrow, (narrow, broad, listed)
    assert all("weapons" in text for text in listed)
    assert len(searches) <= 6, f"the search is debounced, not one request per key: {searches}"
    # The search is a plain URL: opened anew, the server renders the same results (and the map marks them).
    assert "q=fixture+weapons" in page.url
    page.goto(page.url)
    assert page.input_value("#search") == "fixture weapons"
    assert page.locator("#results li").all_inner_texts() == listed
    wait_for_map(page)
    assert page.evaluate("document.getElementById('map-plot').data.find((t) => t.name === 'search hits').x.length") == narrow


def test_loading_a_preset_fills_the_steering_panel(page, app_server: str, tiny_world: TinyWorld) -> None:  # noqa: F811
    first, second = tiny_world.safety[:2]
    open_steering_with(page, first)
    page.locator(f".steer-row[data-feature='{first}'] select").first.select_option("ablate")
    htmx_idle(page)
    page.locator("#add-feature").press_sequentially(second, delay=20)
    page.click(f"#add-results button[data-feature='{second}']")
    page.wait_for_selector(f".steer-row[data-feature='{second}']")
    page.fill("#preset-name", "two features")
    page.click("#preset-save")
    page.wait_for_selector("#preset-list option[value='two features']", state="attached")
    saved = {p["name"]: p for p in httpx.get(f"{app_server}/api/presets").json()}["two features"]
    assert [(i["feature"], i["mode"]) for i in saved["interventions"]] == [(first, "ablate"), (second, "clamp")]

    page.click("#clear-panel")
    page.wait_for_selector("#panel[data-rows='0']", state="attached")
    page.select_option("#preset-list", "two features")
    page.click("#preset-load")
    page.wait_for_selector(f".steer-row[data-feature='{second}']")
    assert page.locator(".steer-row").evaluate_all("rows => rows.map((r) => r.dataset.feature)") == [first, second]
    assert page.locator(f".steer-row[data-feature='{first}'] select").first.input_value() == "ablate"
    assert page.locator(f".steer-row[data-feature='{first}'] input[type=range]").is_disabled()
    # The panel is kept for the set: a reload shows it again.
    page.reload()
    page.wait_for_selector(f".steer-row[data-feature='{second}']")

    page.select_option("#preset-list", "two features")
    page.click("#preset-delete")
    page.wait_for_selector("#preset-list option[value='two features']", state="detached")
    assert "two features" not in {p["name"] for p in httpx.get(f"{app_server}/api/presets").json()}


def test_chat_renders_every_token_chip_through_the_sse_extension(page, app_server: str) -> None:  # noqa: F811
    page.add_init_script("window.__sse = []; document.addEventListener('htmx:sseMessage', (e) => window.__sse.push(e.detail.type));")
    requests: list[tuple[str, str]] = []
    page.on("request", lambda request: requests.append((request.resource_type, request.url)))
    page.goto("/")
    assert page.get_attribute("#transcript", "aria-live") == "polite"
    page.fill("#message", "Tell me three facts about owls.")
    page.fill("#max-new", "40")
    page.fill("#temperature", "0")
    page.click("#send")
    page.wait_for_selector(CHAT_DONE, state="attached", timeout=60_000)
    events = page.evaluate("window.__sse")
    chips = page.locator(".tok.gen")
    n_tokens = int(page.inner_text("#status").split(" tokens")[0])
    assert events.count("token") == chips.count() == n_tokens > 0, (events, n_tokens)
    assert events.index("prompt") < events.index("token") and events[-1] == "done"
    assert page.locator("#turns .tok:not(.gen)").count() > 10  # the prompt's chips
    assert not any("/api/chat" in url for _, url in requests)
    assert [kind for kind, url in requests if "/chat/stream/" in url] == ["eventsource"]

    # The chips carry the overlay of the JSON API's own stream: the same job, the same values.
    with httpx.stream("POST", f"{app_server}/api/chat", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me three facts about owls."}], "max_new_tokens": 40,
            "temperature": 0}) as response:
        api = [data for name, data in sse_events(response) if name == "token"]
    shown = chips.evaluate_all("chips => chips.map((c) => JSON.parse(c.dataset.top))")
    assert len(shown) == len(api)
    for chip, token in zip(shown, api):
        assert [fid for fid, _ in chip] == [fid for fid, _ in token["top"]]
        assert [v for _, v in chip] == pytest.approx([v for _, v in token["top"]], abs=1e-3)

    # The answer's active features are kept for the map to highlight.
    page.click("#map-link")
    wait_for_map(page)
    assert page.get_attribute("#highlight-chat", "checked") is not None
    assert "features active in the chat are shown" in page.inner_text("#active-note")
    assert page.evaluate("document.getElementById('map-plot').data.some((t) => t.name === 'active in chat' && t.x.length > 0)")


def recent_chats(base_url: str) -> dict[int, dict]:
    queue = httpx.get(f"{base_url}/healthz").json()["queue"]
    jobs = [*queue["recent"], *([queue["running"]] if queue["running"] else [])]
    return {job["id"]: job for job in jobs if job["kind"] == "chat"}


def wait_cancelled(base_url: str, after: int) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = [job for i, job in recent_chats(base_url).items() if i > after]
        if jobs and jobs[-1]["status"] == "cancelled":
            return jobs[-1]
        time.sleep(0.05)
    raise AssertionError(f"no chat job after {after} was cancelled: {recent_chats(base_url)}")


def test_a_chat_stopped_or_closed_mid_stream_is_cancelled(page, app_server: str) -> None:  # noqa: F811
    def start() -> int:
        before = max(recent_chats(app_server), default=0)
        old = page.get_attribute("#chat-stream", "data-stream") if page.locator("#chat-stream").count() else None
        page.fill("#message", "Tell me a long story about a lighthouse.")
        page.fill("#max-new", "4000")
        page.fill("#temperature", "1")
        page.click("#send")
        page.wait_for_function("""(old) => {
            const stream = document.getElementById('chat-stream');
            return stream && stream.dataset.stream !== old && stream.querySelectorAll('.tok.gen').length >= 5;
        }""", arg=old, timeout=60_000)
        return before

    page.goto("/")
    before = start()
    page.click("#stop")
    page.wait_for_selector("#chat-stream .stream-end[data-done='stopped']", state="attached")
    stopped = wait_cancelled(app_server, before)
    assert page.inner_text("#status").startswith("stopped after")
    assert 5 <= stopped["tokens_at_cancel"] < 4000 and stopped["tokens"] - stopped["tokens_at_cancel"] <= 2, stopped
    assert not page.is_disabled("#send")

    before = start()
    page.goto("about:blank")  # leaving the page closes its EventSource
    closed = wait_cancelled(app_server, before)
    assert 5 <= closed["tokens_at_cancel"] < 4000 and closed["tokens"] - closed["tokens_at_cancel"] <= 2, closed


def test_chat_works_from_the_keyboard(page) -> None:
    page.goto("/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.focus("#max-new")
    page.keyboard.press("Control+A")
    page.keyboard.type("12")
    page.focus("#message")
    page.keyboard.type("Hello there")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(CHAT_DONE, state="attached", timeout=60_000)
    assert page.input_value("#message") == ""
    page.focus("#transcript")
    page.keyboard.press("ArrowRight")
    chips = page.locator("#transcript .tok")
    assert chips.first.get_attribute("class").split()[-1] == "sel"
    assert "position 0" in page.inner_text("#inspector")
    page.keyboard.press("End")
    assert f"position {chips.count() - 1}" in page.inner_text("#inspector")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Escape")
    assert page.locator("#transcript .tok.sel").count() == 0
