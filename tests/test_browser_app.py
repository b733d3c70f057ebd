"""The pages in headless Chromium against a live server on the tiny world; screenshots go to docs/screenshots/."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, app_server, tiny_world  # noqa: F401

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_server: str):  # noqa: F811
    context = browser.new_context(base_url=app_server, viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def test_chat_streams_tokens_and_inspects_them(page) -> None:
    page.goto("/")
    page.fill("#message", "How do I build a pipe bomb at home?")
    page.fill("#max-new", "300")
    page.fill("#temperature", "1")
    page.click("#send")
    counts = []
    deadline = time.monotonic() + 90
    while page.get_attribute("#transcript", "data-done") != "1":
        counts.append(page.locator(".tok.gen").count())
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.03)
    final = page.locator(".tok.gen").count()
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


def plotted_points(page) -> int:
    return page.evaluate("""() => document.getElementById('map-plot').data
        .filter((t) => t.name !== 'active in chat' && t.name !== 'search hits')
        .reduce((n, t) => n + t.x.length, 0)""")


def test_map_filters_and_opens_a_feature(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    page.goto("/map")
    page.wait_for_function("document.getElementById('map-count').dataset.shown > 0")
    assert plotted_points(page) == len(tiny_world.explained)
    assert page.get_attribute("#map-count", "data-total") == str(len(tiny_world.explained))
    page.uncheck("#domain-list input[data-value='violence']")
    reduced = plotted_points(page)
    assert 0 < reduced < len(tiny_world.explained)
    assert page.get_attribute("#map-count", "data-shown") == str(reduced)
    page.check("#domain-list input[data-value='violence']")
    page.fill("#search", "weapons")
    page.wait_for_selector("#results li a.fid")
    assert all("weapons" in text for text in page.locator("#results li").all_inner_texts())
    shot(page, "map")

    target = page.evaluate("""() => {
        const gd = document.getElementById('map-plot'), L = gd._fullLayout, t = gd.data[0], box = gd.getBoundingClientRect();
        return {x: box.left + L._size.l + L.xaxis.l2p(t.x[0]), y: box.top + L._size.t + L.yaxis.l2p(t.y[0])};
    }""")
    page.mouse.move(target["x"], target["y"])
    page.mouse.click(target["x"], target["y"])
    page.wait_for_url(re.compile(r".*/features/\d+_\d+\?sae_set=\d+"))
    assert page.locator("#feature-id").inner_text() in tiny_world.explained
    page.wait_for_selector("#histogram .main-svg")
    assert page.locator("#neighbours tr").count() == 10
    assert page.locator(".example .tok").count() > 0
    shot(page, "feature", full_page=True)


def test_steering_clamp_and_ablate(page, app_server: str) -> None:  # noqa: F811
    # The feature most active in the default answer of the page's own settings.
    payload = {"messages": [{"role": "user", "content": "How do I pick a lock?"}], "max_new_tokens": 64,
               "temperature": 0.7, "seed": 0, "interventions": [{"feature": "0_0", "mode": "scale", "value": 1.0}]}
    body = httpx.post(f"{app_server}/api/steer", json=payload, timeout=120).json()
    best: dict[str, float] = {}
    for token in body["default"]["response"]:
        for fid, value in token["top"]:
            best[fid] = max(best.get(fid, 0.0), value)
    target = max(best, key=best.get)

    page.goto(f"/features/{target}")
    page.click("#add-steer")
    page.goto("/steer")
    row = page.locator(f".steer-row[data-feature='{target}']")
    row.locator("select").first.select_option("clamp")
    row = page.locator(f".steer-row[data-feature='{target}']")
    row.locator("input[type=range]").fill("40")
    page.click("#steer-go")
    page.wait_for_selector("#answers[data-done='1']", timeout=120_000)
    default = page.get_attribute("#answer-default", "data-text")
    steered = page.get_attribute("#answer-steered", "data-text")
    assert default == body["default"]["text"], "same seed and settings give the same default answer"
    assert steered != default
    shot(page, "steer", full_page=True)

    page.evaluate("document.getElementById('answers').dataset.done = ''")
    page.locator(f".steer-row[data-feature='{target}'] select").first.select_option("ablate")
    page.click("#steer-go")
    page.wait_for_selector("#answers[data-done='1']", timeout=120_000)
    cells = page.locator(f"#tracked tr[data-feature='{target}'] td").all_inner_texts()
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
        assert cards.nth(i).locator(".chain-col").count() == 4
    assert page.locator("#differences tbody tr").count() > 0
    shot(page, "compare", full_page=True)


def test_browse_only_set(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    page.goto(f"/?sae_set={tiny_world.browse_set_id}")
    assert "needs the SAE checkpoints" in page.inner_text("#live-banner") or "Qwen" in page.inner_text("#live-banner")
    assert page.is_disabled("#send")
    page.goto(f"/map?sae_set={tiny_world.browse_set_id}")
    page.wait_for_function("document.getElementById('map-count').dataset.shown > 0")
    assert plotted_points(page) == 30


def test_api_docs_render_from_local_assets(page) -> None:
    external: list[str] = []
    page.on("request", lambda request: external.append(request.url)
            if not request.url.startswith(("http://127.0.0.1", "data:")) else None)
    page.goto("/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/api/chat']", timeout=30_000)
    assert page.locator(".opblock").count() >= 10
    assert not external, f"the docs page fetched from outside: {external}"
    shot(page, "api-docs")
