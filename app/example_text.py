"""Feature-page examples as readable text: the words around the peak token, with the activating tokens marked.

An example is stored as token strings (their concatenation is the text) and one activation per token.
`example_view` turns it into runs of text: consecutive silent tokens merge into one run, so the page shows
sentences rather than sub-word pieces, and only tokens that activate stand out. The window holds `radius`
tokens on either side of the peak; the whole text stays available for expanding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RADIUS = 12


def text_runs(tokens: Sequence[str], activations: Sequence[float]) -> list[list[Any]]:
    """[[text, activation], ...]: activating tokens one by one, silent stretches merged (activation 0)."""
    runs: list[list[Any]] = []
    for token, activation in zip(tokens, activations):
        if activation > 0:
            runs.append([token, round(float(activation), 4)])
        elif runs and runs[-1][1] == 0:
            runs[-1][0] += token
        else:
            runs.append([token, 0.0])
    return runs


def example_view(tokens: Sequence[str], activations: Sequence[float], radius: int = RADIUS) -> dict[str, Any]:
    """The example's text around its peak (`window`) and whole (`text`), as runs, with where the window is cut."""
    peak = max(range(len(activations)), key=activations.__getitem__) if activations else 0
    start, end = max(0, peak - radius), min(len(tokens), peak + radius + 1)
    return {
        "peak": peak,
        "peak_activation": round(float(activations[peak]), 4) if activations else 0.0,
        "window": text_runs(tokens[start:end], activations[start:end]),
        "cut_before": start > 0,
        "cut_after": end < len(tokens),
        "text": text_runs(tokens, activations),
    }
