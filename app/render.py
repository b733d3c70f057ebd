"""What the server-rendered partials share: token chips, domain colours, SSE events carrying HTML.

A token chip is drawn here exactly as the browser drew it before the pages moved to htmx: its label
(newlines and long blank runs made visible), its classes, and its tint (the domain colour of its strongest
feature, deeper with a stronger normalised activation). `static/js/common.js` keeps the same colour rule
(`SM.colour`, `SM.rgba`) for what still runs in the browser: Plotly's traces and re-tinting chips when the
reader hides a domain.

Every text reaches the page through Jinja's autoescaping; nothing here marks model or database text safe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app.deps import DOMAIN_COLOURS, templates
from app.queries import FeatureMeta

OTHER = "other"
GREY = "#868e96"
LONG_BLANKS = re.compile(r" {5,}")
SSE_LINES = re.compile(r"\r\n|\r|\n")


def domain_colour(domain: str | None) -> str:
    """The colour of a domain: the fixed palette, else a hue hashed from the name (as `SM.colour` in JS, which
    hashes UTF-16 code units)."""
    if not domain or domain == OTHER:
        return GREY
    if domain in DOMAIN_COLOURS:
        return DOMAIN_COLOURS[domain]
    hue = 0
    units = domain.encode("utf-16-le")
    for i in range(0, len(units), 2):
        hue = (hue * 31 + int.from_bytes(units[i:i + 2], "little")) % 360
    return f"hsl({hue} 60% 45%)"


def rgba(colour: str, alpha: str) -> str:
    """`colour` (#rrggbb or hsl()) with an alpha, as `SM.rgba`."""
    if colour.startswith("#"):
        n = int(colour[1:], 16)
        return f"rgba({(n >> 16) & 255}, {(n >> 8) & 255}, {n & 255}, {alpha})"
    return colour.replace("hsl(", "hsla(").replace(")", f" / {alpha})")


def primary_domain(meta: FeatureMeta | Mapping[str, Any] | None) -> str:
    domains = (meta.domains if isinstance(meta, FeatureMeta) else meta.get("domains")) if meta else None
    return domains[0] if domains else OTHER


def token_label(text: str) -> str:
    """What a chip shows: `·` for a token that ends inside a character, ↵ and ⇥ for newline and tab, long
    runs of blanks counted (they would stretch a chip across the page)."""
    if text == "":
        return "·"
    label = text.replace("\n", "↵").replace("\t", "⇥")
    return LONG_BLANKS.sub(lambda run: f"␣×{len(run.group())}", label)


def tint(token: Mapping[str, Any], catalog: Mapping[str, FeatureMeta]) -> tuple[str, str]:
    """(background, title) of a chip: the colour of its strongest feature's first domain, alpha by activation."""
    if token.get("content") is False:
        return "", "template or system prompt: shown, never counted"
    top = token.get("top") or []
    best = next(((fid, value) for fid, value in top if fid in catalog), top[0] if top else None)
    if best is None or best[1] <= 0:
        return "", "no counted feature"
    fid, value = best
    alpha = min(0.9, 0.1 + 0.75 * min(value, 1.2) / 1.2)
    return rgba(domain_colour(primary_domain(catalog.get(fid))), f"{alpha:.3f}"), f"{fid} · {value:.2f}"


def chip(token: Mapping[str, Any], catalog: Mapping[str, FeatureMeta], live: bool = False) -> dict[str, Any]:
    """The view of one token chip: label, classes, tint, and its features for the hover script (`top`)."""
    text = token["text"]
    classes = ["tok"]
    if token.get("special"):
        classes.append("special")
    if token.get("content") is False:
        classes.append("template")
    if text == "":
        classes.append("partial")
    if "\n" in text:
        classes.append("nl")
    if live:
        classes.append("gen")
    background, title = tint(token, catalog)
    return {
        "label": token_label(text),
        "classes": " ".join(classes),
        "background": background,
        "title": title,
        "br": text.endswith("\n") and not token.get("special"),
    }


def error_text(detail: Any) -> str:
    """An error's `detail` in one line: `field.path: message; ...` for validation lists (as the pages showed it)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query", "path"))
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def html_event(event: str, html: str) -> str:
    """One Server-Sent Event whose data is an HTML fragment. Every line of the fragment is its own `data:` line
    (EventSource joins them with newlines); a carriage return, which SSE would read as a line end, is written
    as the character reference `&#13;`, which HTML reads back as the same character."""
    html = html.replace("\r", "&#13;")
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in SSE_LINES.split(html)) + "\n"


def render(name: str, **context: Any) -> str:
    """A partial template rendered to a string (for SSE events and out-of-band pieces)."""
    return templates.get_template(name).render(**context)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def top_risks(probe: Mapping[str, Any] | None, n: int = 3) -> list[tuple[str, Any]]:
    """The `n` domains with the highest probe risk (the `any` probe aside), highest first."""
    items = [(domain, risk) for domain, risk in (probe or {}).items() if domain != "any"]
    return sorted(items, key=lambda item: -item[1]["p"])[:n]


templates.env.globals.update(domain_colour=domain_colour, rgba=rgba, token_label=token_label, chip_view=chip,
                             primary_domain=primary_domain, pct=pct, fmt=fmt, top_risks=top_risks, OTHER=OTHER)
