"""The pages in headless Chromium against a live server on the tiny world; screenshots go to docs/screenshots/."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from browser_support import (  # noqa: F401
    browser,
    first_point,
    most_active_feature,
    open_page,
    open_steering_with,
    plotted_points,
    run_steering,
    shot,
    stream_counts,
)
from fixtures_db import TinyWorld, app_server, tiny_world  # noqa: F401


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
