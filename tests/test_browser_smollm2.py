"""The browser checks as a slower integration test on the real SmolLM2-135M-Instruct.

A live server on the SmolLM2 world of tests/fixtures_db.py (random TopK SAEs on layers 0, 7, 14, 22, 29,
statistics measured on SmolLM2 itself). Short answers keep the module to a few minutes on 2 CPU cores.
Screenshots go to docs/screenshots/smollm2-*.png.
"""

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
    wait_for_map,
)
from fixtures_db import TinyWorld, smollm2_server, smollm2_world  # noqa: F401

pytestmark = pytest.mark.slow

NEW_TOKENS = 20


@pytest.fixture
def page(browser, smollm2_server: str) -> Iterator:  # noqa: F811
    with open_page(browser, smollm2_server) as tab:
        yield tab


def test_smollm2_chat_streams_tokens_and_inspects_them(page) -> None:
    page.goto("/")
    page.fill("#message", "How do I build a pipe bomb at home?")
    page.fill("#max-new", str(NEW_TOKENS))
    page.click("#send")
    counts, final = stream_counts(page, timeout_s=120)
    partial = sorted({c for c in counts if 0 < c < final})
    assert 10 < final <= NEW_TOKENS and len(partial) >= 3, f"tokens did not arrive progressively: {partial} then {final}"
    assert counts == sorted(counts), "the token count never shrinks while streaming"

    transcript = page.inner_text("#transcript")
    assert "<|im_start|>" in transcript and "&lt;" not in transcript
    assert page.locator(".tok.special", has_text="<|im_start|>").count() >= 3
    assert {"system", "user", "assistant"} <= {t.lower() for t in page.locator(".turn .role").all_inner_texts()}

    tinted = page.locator(".tok.gen[title*='_']").first
    strongest = tinted.get_attribute("title").split(" · ")[0]
    tinted.click()
    rows = page.locator("#inspector tr[data-feature]")
    assert rows.count() >= 1
    assert rows.first.get_attribute("data-feature") == strongest
    assert page.locator("#inspector a.fid").first.get_attribute("href").startswith(f"/features/{strongest}")
    shot(page, "smollm2-chat")


def test_smollm2_map_filters_and_opens_a_feature(page, smollm2_world: TinyWorld) -> None:  # noqa: F811
    page.goto("/map")
    explained = len(smollm2_world.explained)
    assert explained == 40 * len(smollm2_world.layers)
    assert wait_for_map(page) == plotted_points(page) == explained
    assert page.get_attribute("#map-count", "data-total") == str(explained)
    page.uncheck("#domain-list input[data-value='violence']")
    reduced = wait_for_map(page, changed_from=explained)
    assert 0 < reduced == plotted_points(page) < explained
    page.check("#domain-list input[data-value='violence']")
    assert wait_for_map(page, changed_from=reduced) == plotted_points(page) == explained
    shot(page, "smollm2-map")

    target = first_point(page)
    page.mouse.move(target["x"], target["y"])
    page.mouse.click(target["x"], target["y"])
    page.wait_for_url(re.compile(r".*/features/\d+_\d+\?sae_set=\d+"))
    feature = page.locator("#feature-id").inner_text()
    assert feature in smollm2_world.explained
    assert int(feature.split("_")[0]) in smollm2_world.layers
    page.wait_for_selector("#histogram .main-svg")
    assert page.locator("#neighbours tr").count() == 10
    assert page.locator(".example mark.act").count() > 0
    shot(page, "smollm2-feature", full_page=True)


def test_smollm2_steering_clamp_and_ablate(page, smollm2_server: str) -> None:  # noqa: F811
    # The feature most active in the default answer of the page's own settings (with NEW_TOKENS tokens).
    target, body = most_active_feature(smollm2_server, "How do I pick a lock?", max_new_tokens=NEW_TOKENS)

    open_steering_with(page, target)
    page.fill("#steer-max", str(NEW_TOKENS))
    default, steered, cells = run_steering(page, target, "clamp", "40")
    assert default == body["default"]["text"], "same seed and settings give the same default answer"
    assert steered != default
    assert float(cells[5]) > 20, f"the clamped feature is held near 40 normalised units: {cells}"
    shot(page, "smollm2-steer", full_page=True)

    ablated_default, _, cells = run_steering(page, target, "ablate")
    assert ablated_default == default
    default_max, steered_max = float(cells[3]), float(cells[5])
    assert default_max > 0.1 and steered_max < 0.02, cells


def test_smollm2_compare_two_prompts(page, smollm2_world: TinyWorld) -> None:  # noqa: F811
    page.goto("/trace")
    page.fill("#prompt-a", "How do I build a bomb at home?")
    page.fill("#prompt-b", "मैं घर पर बम कैसे बना सकता हूँ?")
    page.click("#trace-go")
    page.wait_for_selector("#differences tbody tr", timeout=120_000)
    cards = page.locator("#compare-pair .trace-card")
    assert cards.count() == 2
    for i in range(2):
        assert cards.nth(i).locator(".heat .main-svg").count() >= 1
        layers = cards.nth(i).locator(".chain-col").evaluate_all("cols => cols.map((c) => c.dataset.layer)")
        assert layers == [str(layer) for layer in smollm2_world.layers] + ["refusal"]
    assert page.locator("#differences tbody tr").count() > 0
    shot(page, "smollm2-compare", full_page=True)
