"""Shared pieces of the browser tests: headless Chromium, a page per test, screenshots, and page probes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

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


@contextmanager
def open_page(browser, base_url: str) -> Iterator:
    """A fresh browser context on `base_url`; fails the test if a page raised a JavaScript error."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


# The end marker a finished answer's stream appends (templates/partials/chat_end.html).
CHAT_DONE = "#chat-stream .stream-end[data-done='done']"


def stream_counts(page, timeout_s: float) -> tuple[list[int], int]:
    """Poll the chat until the answer is done: the generated-chip counts seen on the way, and the final count."""
    counts = []
    deadline = time.monotonic() + timeout_s
    while page.locator(CHAT_DONE).count() == 0:
        counts.append(page.locator(".tok.gen").count())
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.03)
    return counts, page.locator(".tok.gen").count()


def htmx_idle(page, timeout_ms: float = 30_000) -> None:
    """Wait until no htmx request is in flight (htmx marks the requesting element with `htmx-request`)."""
    page.wait_for_function("() => !document.querySelector('.htmx-request')", timeout=timeout_ms)


def wait_for_map(page, changed_from: int | None = None) -> int:
    """Wait until the map has drawn what the server's count says is shown (and, given `changed_from`, until
    that count changed); the shown count."""
    page.wait_for_function("""(before) => {
        const plot = document.getElementById('map-plot'), count = document.getElementById('map-count');
        return !document.querySelector('.htmx-request') && plot && plot.data && count
            && plot.dataset.shown === count.dataset.shown && +count.dataset.shown > 0
            && (before === null || +count.dataset.shown !== before);
    }""", arg=changed_from, timeout=30_000)
    return int(page.get_attribute("#map-count", "data-shown"))


def plotted_points(page) -> int:
    return page.evaluate("""() => document.getElementById('map-plot').data
        .filter((t) => t.name !== 'active in chat' && t.name !== 'search hits')
        .reduce((n, t) => n + t.x.length, 0)""")


def first_point(page) -> dict[str, float]:
    """Viewport coordinates of the first point of the map's first trace."""
    return page.evaluate("""() => {
        const gd = document.getElementById('map-plot'), L = gd._fullLayout, t = gd.data[0], box = gd.getBoundingClientRect();
        return {x: box.left + L._size.l + L.xaxis.l2p(t.x[0]), y: box.top + L._size.t + L.yaxis.l2p(t.y[0])};
    }""")


def most_active_feature(base_url: str, prompt: str, max_new_tokens: int, temperature: float = 0.7,
                        seed: int = 0) -> tuple[str, dict]:
    """The feature with the highest activation in the default answer of `/api/steer` (and the response)."""
    payload = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": max_new_tokens,
               "temperature": temperature, "seed": seed,
               "interventions": [{"feature": "0_0", "mode": "scale", "value": 1.0}]}
    response = httpx.post(f"{base_url}/api/steer", json=payload, timeout=300)
    response.raise_for_status()
    body = response.json()
    best: dict[str, float] = {}
    for token in body["default"]["response"]:
        for fid, value in token["top"]:
            best[fid] = max(best.get(fid, 0.0), value)
    return max(best, key=best.get), body


def open_steering_with(page, feature: str) -> None:
    """Add `feature` to the steering panel from its feature page, then open the steering page."""
    page.goto(f"/features/{feature}")
    with page.expect_response(lambda response: "/steer/panel/add" in response.url):
        page.click("#add-steer")
    page.goto("/steer")
    page.wait_for_selector(f".steer-row[data-feature='{feature}']")


def run_steering(page, feature: str, mode: str, value: str | None = None) -> tuple[str, str, list[str]]:
    """Set the feature's row to `mode` (and `value`), generate, and wait: default text, steered text, tracked cells.
    Each change of the panel is posted and the panel rendered again; the next step waits for that."""
    page.evaluate("document.getElementById('answers').dataset.done = ''")
    page.locator(f".steer-row[data-feature='{feature}']").locator("select").first.select_option(mode)
    htmx_idle(page)
    if value is not None:
        page.locator(f".steer-row[data-feature='{feature}']").locator("input[type=range]").fill(value)
        htmx_idle(page)
    page.click("#steer-go")
    page.wait_for_selector("#answers[data-done='1']", timeout=120_000)
    cells = page.locator(f"#tracked tr[data-feature='{feature}'] td").all_inner_texts()
    return page.get_attribute("#answer-default", "data-text"), page.get_attribute("#answer-steered", "data-text"), cells
