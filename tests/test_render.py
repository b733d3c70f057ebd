"""The server-rendered pieces on their own: token chips, their tint, SSE events of HTML, the risk line."""

from __future__ import annotations

import json
import re

from app.queries import FeatureMeta
from app.render import chip, domain_colour, html_event, render, tint, token_label

CATALOG = {
    "1_5": FeatureMeta("1_5", 1, 5, 1, 1.0, True, 0.1, 0.0, 0.0, "weapons <b>bold</b>", "fixture", 0.5, "sls", ["violence"]),
    "2_7": FeatureMeta("2_7", 2, 7, 2, 1.0, True, 0.1, 0.0, 0.0, None, None, None, None, ["<img src=x onerror=alert(1)>"]),
}


def token(text: str, top: list, content: bool = True, **extra) -> dict:
    return {"i": 3, "id": 9, "text": text, "special": False, "role": "user", "turn": 2, "content": content,
            "tint": top[0][1] if top else 0.0, "top": top, **extra}


def test_labels_and_tints_match_the_pages_rules() -> None:
    assert token_label("") == "·" and token_label("a\nb\t") == "a↵b⇥" and token_label("x      y") == "x␣×6y"
    assert tint(token("hi", [["1_5", 1.2]]), CATALOG) == ("rgba(232, 89, 12, 0.850)", "1_5 · 1.20")
    assert tint(token("hi", [["1_5", 0.0]]), CATALOG) == ("", "no counted feature")
    assert tint(token("hi", [["1_5", 1.0]], content=False), CATALOG)[0] == ""
    hashed = domain_colour("<img src=x onerror=alert(1)>")
    assert re.fullmatch(r"hsl\(\d{1,3} 60% 45%\)", hashed) and domain_colour("violence") == "#e8590c"
    assert domain_colour("😀") == domain_colour("😀")  # hashed over UTF-16 code units, as in the browser
    view = chip(token("line\n", [["2_7", 0.4]]), CATALOG, live=True)
    assert view["classes"] == "tok nl gen" and view["br"] and view["label"] == "line↵"


def test_a_chip_is_escaped_and_carries_its_features() -> None:
    fragment = render("partials/chat_token.html", token=token("<script>x</script>'", [["1_5", 0.8], ["2_7", 0.2]]),
                      new_turn=False, catalog=CATALOG, progress="1 tokens")
    assert "<script>" not in fragment and "&lt;script&gt;x&lt;/script&gt;&#39;" in fragment
    top = re.search(r"data-top='([^']*)'", fragment).group(1)
    assert json.loads(top) == [["1_5", 0.8], ["2_7", 0.2]]
    assert not fragment.startswith((" ", "\n")) and "\n" not in fragment  # chips sit side by side


def test_html_events_keep_every_line_and_carriage_return() -> None:
    event = html_event("token", "<b>a\r\nb</b>\n<i>c\rd</i>")
    assert event == "event: token\ndata: <b>a&#13;\ndata: b</b>\ndata: <i>c&#13;d</i>\n\n"


def test_the_risk_line_shows_each_domains_reasons() -> None:
    risk = {"turn": 2, "probe": {
        "any": {"p": 0.61, "logit": 0.4, "layer": 1, "representation": "mean", "reasons": []},
        "violence": {"p": 0.55, "logit": 0.2, "layer": 1, "representation": "mean",
                     "reasons": [{"id": "1_5", "contribution": 0.42, "activation": 1.0}, {"id": "2_7", "contribution": -0.1, "activation": 0.3}]},
        "<img src=x onerror=alert(1)>": {"p": 0.2, "logit": -1.0, "layer": 2, "representation": "last", "reasons": []},
    }, "ksparse": {"violence": 0.3}}
    prompt = render("partials/chat_prompt.html", tokens=[token("bomb", [["1_5", 0.8]])], summaries={2: {"violence": 0.8}},
                    risk=risk, catalog=CATALOG, set_id=1)
    line = re.search(r'<div class="turn-risk small".*?</div>', prompt, re.S).group(0)
    assert 'data-any="0.610"' in line and "any 61%" in line
    assert line.index("violence") < line.index("&lt;img")  # the riskiest domain first
    assert "reasons: 1_5 +0.42, 2_7 -0.10; k-sparse SAE probe 30%" in line
    assert line.count('tabindex="0"') == 2 and line.count('role="tooltip"') == 2  # reasons show on focus too
    assert "<img" not in prompt
