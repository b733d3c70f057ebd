"""Hostile text renders as text: chat, map (hover and search), feature page, trace, in headless Chromium.

Every explanation of the live set, some example contexts, output tokens and a domain name are
rewritten (in a private copy of the tiny world's database) to carry `<script>`, event-handler
attributes, `javascript:` links and template syntax; the prompts typed into chat and trace carry
the same. A payload that ran would set `window.__pwned` or open a dialog; each page must show the
literal text instead. The model's own output goes through the same token renderer as the prompt
(the Jinja chip partial, autoescaped); a random tiny model cannot be made to write a payload on demand.

Search input is bound, never formatted into SQL (`starmap/db/search.py`, `app/queries.py`): SQL-ish
queries return normally and leave the database as it was.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser_support import CHAT_DONE, browser, wait_for_map  # noqa: F401
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import copy_database

from app.loopback_server import serve_on_loopback

HOSTILE = ('<b>B</b><a href="javascript:window.__pwned=3">L</a><script>window.__pwned=1</script>'
           '<img src=x onerror="window.__pwned=2;alert(2)"> {{7*7}} {% if true %}T{% endif %} ${7*7} '
           '</td></tr></textarea><svg onload=window.__pwned=4>')
SCRIPT = "<script>window.__pwned=1</script>"
DOMAIN = "<img src=y onerror=window.__pwned=5>"
SQLISH = ["'); DROP TABLE explanations; --", '" OR 1=1 --', "*", "NEAR(a b)", "a AND b OR c", "%_%", "\\"]


def hostile_database(world: TinyWorld, folder: Path) -> Path:
    database = copy_database(world, folder)
    with sqlite3.connect(database) as db:
        db.execute("UPDATE explanations SET text = :hostile || ' #' || "
                   "(SELECT feature_id FROM features WHERE features.id = explanations.feature_id)", {"hostile": HOSTILE})
        db.execute("UPDATE examples SET tokens = json_array(:a, :b, :c) , activations = json_array(0.1, 0.9, 0.2)",
                   {"a": "<b>bold?</b>", "b": SCRIPT, "c": "{{7*7}}"})
        db.execute("UPDATE features SET top_tokens = json_array(json_object('token', :t, 'value', 1.5)) "
                   "WHERE top_tokens IS NOT NULL", {"t": '<img src=z onerror="window.__pwned=6">'})
        db.execute("INSERT INTO domains (name) VALUES (?)", (DOMAIN,))
        db.execute("INSERT INTO feature_domains (feature_id, domain_id, source) SELECT e.feature_id, d.id, 'filter' "
                   "FROM explanations e, domains d WHERE d.name = ? AND e.id % 3 = 0", (DOMAIN,))
    return database


@pytest.fixture(scope="module")
def server(tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:  # noqa: F811
    from app.main import create_app
    from app.state import ServerOptions

    database = hostile_database(tiny_world, tmp_path_factory.mktemp("xss"))
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": f"sqlite:///{database}"})
    app = create_app(settings, ServerOptions(queue_size=4, max_new_tokens=64))
    with serve_on_loopback(app) as url:
        yield url, database


@pytest.fixture
def page(browser, server):  # noqa: F811
    url, _ = server
    context = browser.new_context(base_url=url, viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []

    def dismiss(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    tab.on("dialog", dismiss)
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    pwned = tab.evaluate("() => window.__pwned")
    context.close()
    assert pwned is None, f"an injected script ran (window.__pwned = {pwned})"
    assert not dialogs, f"an injected script opened dialogs: {dialogs}"
    assert not errors, f"JavaScript errors: {errors}"


def hover_text(page) -> str:
    """The hover label's text, without whitespace (Plotly breaks its lines at spaces)."""
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    return re.sub(r"\s", "", page.locator(".hoverlayer").text_content())


def squeezed(text: str) -> str:
    return re.sub(r"\s", "", text)


def test_chat_shows_a_hostile_prompt_and_hostile_explanations_as_text(page) -> None:
    page.goto("/")
    page.click("#system-box summary")
    page.fill("#system", HOSTILE)
    page.fill("#message", HOSTILE)
    page.fill("#max-new", "12")
    page.click("#send")
    page.wait_for_selector(CHAT_DONE, state="attached", timeout=120_000)
    turns = page.locator(".turn .tokens").all_inner_texts()
    assert sum(HOSTILE.replace(" ", "") in text.replace(" ", "") for text in turns) == 2, turns
    assert page.locator("#transcript script, #transcript img, #transcript svg, #transcript a[href^='javascript']").count() == 0
    # Inspect a tinted token: its features' explanations are the hostile text, shown literally.
    page.locator(".tok[title*='_']").first.click()
    inspector = page.inner_text("#inspector")
    assert SCRIPT in inspector and "{{7*7}}" in inspector and "{% if true %}T{% endif %}" in inspector
    assert page.locator("#inspector script, #inspector img, #inspector svg").count() == 0


def test_map_hover_and_search_show_hostile_text(page, server) -> None:
    url, database = server
    page.goto("/map")
    wait_for_map(page)
    target = page.evaluate("""() => {
        const gd = document.getElementById('map-plot'), L = gd._fullLayout, t = gd.data[0], box = gd.getBoundingClientRect();
        return {x: box.left + L._size.l + L.xaxis.l2p(t.x[0]), y: box.top + L._size.t + L.yaxis.l2p(t.y[0])};
    }""")
    page.mouse.move(target["x"], target["y"])
    text = hover_text(page)
    assert squeezed(HOSTILE)[:160] in text, text  # the map shows up to 240 characters of an explanation
    assert DOMAIN in page.locator(".legend").text_content() and DOMAIN in page.inner_text("#domain-list")

    page.fill("#search", "pwned")
    page.wait_for_selector("#search-results[data-q='pwned'] #results li a.fid")
    results = page.locator("#results li").all_inner_texts()
    assert results and all(HOSTILE in item for item in results), results[:2]
    assert page.locator("#results script, #results img, #results svg, #results a[href^='javascript']").count() == 0

    before = sqlite3.connect(database).execute("SELECT count(*) FROM explanations").fetchone()[0]
    for query in SQLISH:
        response = httpx.get(f"{url}/api/features", params={"q": query})
        assert response.status_code == 200, (query, response.text)
        assert all("DROP" not in (item["explanation"] or "") for item in response.json()["items"])
    after = sqlite3.connect(database).execute("SELECT count(*) FROM explanations").fetchone()[0]
    assert before == after > 0


def test_feature_page_shows_hostile_explanation_examples_and_tokens(page, tiny_world: TinyWorld) -> None:  # noqa: F811
    fid = tiny_world.safety[0]
    page.goto(f"/features/{fid}")
    assert page.locator(".explanation").first.inner_text() == f"{HOSTILE} #{fid}"
    body = page.inner_text("main")
    assert "<b>bold?</b>" in body and SCRIPT in body and "{{7*7}}" in body
    assert '<img src=z onerror="window.__pwned=6">' in body
    injected = page.evaluate("""() => [...document.querySelectorAll(
        "main script, main img, main svg, main iframe, main a[href^='javascript']")]
        .filter((node) => !node.closest('#histogram')).map((node) => node.outerHTML.slice(0, 80))""")
    assert injected == [], injected  # the histogram's own SVG aside
    assert all(HOSTILE in text for text in page.locator("#neighbours td.expl").all_inner_texts() if "(no explanation)" not in text)


def test_trace_shows_hostile_prompt_and_explanations_as_text(page) -> None:
    page.goto("/trace")
    page.fill("#prompt-a", HOSTILE)
    page.click("#trace-go")
    page.wait_for_selector(".chain-col", timeout=120_000)
    chain = page.inner_text("#trace-results")
    assert SCRIPT in chain and "{{7*7}}" in chain
    assert page.locator("#trace-results .chain script, #trace-results .chain img, #trace-results .chain svg").count() == 0
    # Hover the strongest cell of the heatmap: token text and explanation appear literally.
    target = page.evaluate("""() => {
        const gd = document.querySelector('.heat'), L = gd._fullLayout, z = gd.data[0].z, box = gd.getBoundingClientRect();
        let best = [0, 0];
        z.forEach((row, l) => row.forEach((v, i) => { if (v > z[best[0]][best[1]]) best = [l, i]; }));
        return {x: box.left + L._size.l + L.xaxis.l2p(best[1]), y: box.top + L._size.t + L.yaxis.l2p(best[0])};
    }""")
    page.mouse.move(target["x"], target["y"])
    assert squeezed(HOSTILE[:90]) in hover_text(page)  # the heatmap shows 90 characters of an explanation
    ticks = "".join(page.locator(".heat .xtick text").all_text_contents())
    assert "<" in ticks and "script" in ticks
