"""The chat prompts of the LLM explainer and of the LLM simulators (token- and segment-level)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from offline_pipeline.explain.records import N_LEVELS, ActivationRecord, FeatureExamples

MARK_OPEN, MARK_CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = (
    "We are studying features of a language model. A feature fires on some tokens of a text and not on others. "
    f"You will see texts where the feature fires, grouped by activation level (level {N_LEVELS} is the strongest), "
    f"with the tokens where it fires marked {MARK_OPEN}like this{MARK_CLOSE}, and texts where it does not fire. "
    "Describe in one short sentence what the feature detects. Quote the key words it fires on. "
    "Reply with the sentence only."
)

TLS_SYSTEM = (
    "You predict where a feature of a language model fires, from an explanation of the feature. "
    "For every numbered token of every text, predict the feature's activation on that token as an integer from "
    "0 (not active) to 10 (as strong as it ever gets). Reply with a JSON object only: each text id mapped to the "
    'list of its predictions, one integer per token, in order. Example: {"t1":[0,0,7,0],"t2":[0,0]}'
)

SEGMENT_SEPARATOR = " | "

SLS_SYSTEM = (
    "You predict where a feature of a language model fires, from an explanation of the feature. "
    f"Every text is cut into segments, separated by '{SEGMENT_SEPARATOR.strip()}'. For every segment answer 1 if the "
    "feature fires anywhere in it, else 0. Reply with a JSON object only: each text id mapped to the list of its "
    'answers, one 0 or 1 per segment, in order. Example: {"t1":[0,1,0],"t2":[0,0]}'
)


@dataclass(frozen=True)
class ExplainerPromptConfig:
    examples_per_level: int = 2
    n_hard_negatives: int = 3
    mark_fraction: float = 0.25  # mark tokens at or above this fraction of the example's own maximum
    max_example_tokens: int = 64  # longer examples are cut to a window around their maximum


def _window(record: ActivationRecord, size: int) -> tuple[list[str], list[float]]:
    if len(record.tokens) <= size:
        return record.tokens, record.activations
    peak = record.activations.index(record.max_activation)
    start = max(0, min(peak - size // 2, len(record.tokens) - size))
    return record.tokens[start : start + size], record.activations[start : start + size]


def mark_tokens(record: ActivationRecord, mark_fraction: float, max_tokens: int) -> str:
    """The text with each run of activating tokens wrapped in << >> (leading whitespace left outside)."""
    tokens, activations = _window(record, max_tokens)
    peak = max(activations, default=0.0)
    threshold = peak * mark_fraction
    parts: list[str] = []
    open_run = False
    for token, activation in zip(tokens, activations):
        marked = peak > 0 and activation > 0 and activation >= threshold
        if marked and not open_run:
            stripped = token.lstrip()
            parts.append(token[: len(token) - len(stripped)] + MARK_OPEN + stripped)
            open_run = True
        elif not marked and open_run:
            parts.append(MARK_CLOSE + token)
            open_run = False
        else:
            parts.append(token)
    if open_run:
        parts.append(MARK_CLOSE)
    return "".join(parts).replace("\n", "\\n")


def explainer_messages(examples: FeatureExamples, config: ExplainerPromptConfig) -> list[dict[str, str]]:
    lines = ["Texts where the feature fires, strongest level first:"]
    for level in reversed(range(N_LEVELS)):
        records = examples.levels[level][: config.examples_per_level]
        if not records:
            continue
        low, high = 10 * level, 10 * (level + 1)
        lines.append(f"Level {level + 1} ({low}-{high}% of the maximum activation):")
        lines += [f"- {mark_tokens(r, config.mark_fraction, config.max_example_tokens)}" for r in records]
    negatives = examples.hard_negatives[: config.n_hard_negatives]
    if negatives:
        lines.append("Texts where the feature does NOT fire, although they share words with the texts above:")
        lines += [f"- {mark_tokens(r, config.mark_fraction, config.max_example_tokens)}" for r in negatives]
    if examples.top_output_tokens:
        quoted = ", ".join(json.dumps(t.strip(), ensure_ascii=False) for t in examples.top_output_tokens[:10])
        lines.append(f"Tokens the feature makes more likely as the next token: {quoted}")
    lines.append("What does the feature detect? One short sentence.")
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def query_id(position: int) -> str:
    return f"t{position + 1}"


def tls_messages(explanation: str, records: list[ActivationRecord]) -> list[dict[str, str]]:
    blocks = [f"Explanation of the feature: {explanation}"]
    for position, record in enumerate(records):
        rows = [f"{i + 1} {json.dumps(token, ensure_ascii=False)}" for i, token in enumerate(record.tokens)]
        blocks.append(f"Text {query_id(position)} ({len(record.tokens)} tokens):\n" + "\n".join(rows))
    return [{"role": "system", "content": TLS_SYSTEM}, {"role": "user", "content": "\n\n".join(blocks)}]


def segmented_line(segments: list[str]) -> str:
    """A text's segments on one line between separators; a '|' of the text itself is escaped as '\\|'.

    Segments are whole words, so a separator marks their boundaries unambiguously. Numbering each
    segment on its own line (as TLS does for tokens, where alignment needs it) would spend about
    three prompt tokens per segment on numbers, quotes and newlines: a quarter of an SLS prompt.
    """
    return SEGMENT_SEPARATOR.join(" ".join(text.split()).replace("|", "\\|") for text in segments)


def sls_messages(explanation: str, segmented: list[list[str]]) -> list[dict[str, str]]:
    blocks = [f"Explanation of the feature: {explanation}"]
    for position, segments in enumerate(segmented):
        blocks.append(f"Text {query_id(position)} ({len(segments)} segments): {segmented_line(segments)}")
    return [{"role": "system", "content": SLS_SYSTEM}, {"role": "user", "content": "\n\n".join(blocks)}]
