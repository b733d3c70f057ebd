"""Simulators: predict a feature's activations on texts from its explanation alone.

Two kinds, each answering both questions the scorers ask (per token 0-10, per segment 0/1):
- `LLMSimulator`: a chat model behind an OpenAI-compatible endpoint, answering JSON: under a JSON
  schema (structured outputs: one list of the right length and range per query) where the
  endpoint supports schemas, else in JSON mode, else by the prompt alone. Where the endpoint
  returns logprobs, each predicted number is replaced by its expected value over the
  model's top alternatives at that position (OpenAI's "expected value" simulator), which gives a
  graded prediction instead of a hard one. An answer that does not parse, or has the wrong number
  of entries or an out-of-range value for a query, is a parse failure for that query.
- `LexicalSimulator` (`offline-lexical`): the offline default; a word of the text is predicted
  active when it contains a term quoted in the explanation.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from offline_pipeline.explain.llm_client import LLMClient, TokenLogprob, Usage
from offline_pipeline.explain.prompts import query_id, sls_messages, tls_messages
from offline_pipeline.explain.records import ActivationRecord
from offline_pipeline.explain.segments import token_offsets

TLS_RANGE = (0, 10)
SLS_RANGE = (0, 1)


@dataclass
class Simulation:
    predictions: list[list[float] | None]  # one list per query, None where the answer failed to parse
    usage: Usage

    @property
    def n_parse_failures(self) -> int:
        return sum(p is None for p in self.predictions)


class Simulator(Protocol):
    @property
    def name(self) -> str: ...

    async def predict_tokens(self, explanation: str, records: list[ActivationRecord]) -> Simulation: ...

    async def predict_segments(self, explanation: str, segmented: list[list[str]]) -> Simulation: ...


def predictions_schema(lengths: list[int], value_range: tuple[int, int]) -> dict[str, Any]:
    """The JSON schema of an answer: each query id mapped to its list of integers, of its length."""
    low, high = value_range
    return {
        "type": "object",
        "properties": {
            query_id(i): {
                "type": "array",
                "items": {"type": "integer", "minimum": low, "maximum": high},
                "minItems": n,
                "maxItems": n,
            }
            for i, n in enumerate(lengths)
        },
        "required": [query_id(i) for i in range(len(lengths))],
        "additionalProperties": False,
    }


def _json_object(text: str) -> tuple[dict[str, Any], int, int] | None:
    """The first JSON object in `text`, with its start and end offsets."""
    start = text.find("{")
    while start != -1:
        try:
            value, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value, start, end
        start = text.find("{", end)
    return None


def _valid_numbers(values: Any, length: int, value_range: tuple[int, int]) -> list[float] | None:
    if not isinstance(values, list) or len(values) != length:
        return None
    low, high = value_range
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in values):
        return None
    return [float(v) for v in values]


def parse_predictions(text: str, lengths: list[int], value_range: tuple[int, int]) -> list[list[float] | None]:
    """Per query, its list of predictions from a JSON answer `{"t1": [...], ...}`; None where invalid."""
    found = _json_object(text)
    if found is None:
        return [None] * len(lengths)
    answer = found[0]
    return [_valid_numbers(answer.get(query_id(i)), n, value_range) for i, n in enumerate(lengths)]


def _number_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Character spans of the number literals of a JSON document, outside strings, in order."""
    spans, position, in_string = [], start, False
    number = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
    while position < end:
        char = text[position]
        if in_string:
            if char == "\\":
                position += 1
            elif char == '"':
                in_string = False
            position += 1
        elif char == '"':
            in_string = True
            position += 1
        elif char == "-" or char.isdigit():
            match = number.match(text, position)
            if match is None:
                position += 1
                continue
            spans.append(match.span())
            position = match.end()
        else:
            position += 1
    return spans


def _flat_numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _flat_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _flat_numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def _expected_value(
    literal_span: tuple[int, int], tokens: list[TokenLogprob], offsets: list[tuple[int, int]], value_range: tuple[int, int]
) -> float | None:
    """The expected number at a literal that lies inside one token, over that token's top alternatives
    that differ from it only in the number."""
    a, b = literal_span
    for token, (start, end) in zip(tokens, offsets):
        if start <= a and b <= end:
            prefix, suffix = token.token[: a - start], token.token[b - start :]
            break
    else:
        return None
    weights = {}
    for alternative, logprob in [(token.token, token.logprob), *token.top]:
        if not (alternative.startswith(prefix) and alternative.endswith(suffix)):
            continue
        middle = alternative[len(prefix) : len(alternative) - len(suffix)]
        if middle.isdigit() and value_range[0] <= int(middle) <= value_range[1]:
            weights[int(middle)] = math.exp(logprob)
    total = sum(weights.values())
    if total <= 0:
        return None
    return sum(value * weight for value, weight in weights.items()) / total


def apply_logprobs(
    text: str,
    predictions: list[list[float] | None],
    logprobs: list[TokenLogprob] | None,
    value_range: tuple[int, int],
) -> tuple[list[list[float] | None], bool]:
    """Replace each valid prediction by its expected value where the logprobs allow; (predictions, used)."""
    found = _json_object(text)
    if not logprobs or found is None or "".join(t.token for t in logprobs) != text:
        return predictions, False
    answer, start, end = found
    spans = _number_spans(text, start, end)
    if len(spans) != len(_flat_numbers(answer)):
        return predictions, False
    offsets = token_offsets([t.token for t in logprobs])
    span_of = {}
    position = 0
    for key, value in answer.items():
        count = len(_flat_numbers(value))
        span_of[key] = spans[position : position + count]
        position += count
    used = False
    updated: list[list[float] | None] = []
    for i, values in enumerate(predictions):
        key_spans = span_of.get(query_id(i), [])
        if values is None or len(key_spans) != len(values):
            updated.append(values)
            continue
        expected = [_expected_value(span, logprobs, offsets, value_range) for span in key_spans]
        used = used or any(e is not None for e in expected)
        updated.append([v if e is None else e for v, e in zip(values, expected)])
    return updated, used


class LLMSimulator:
    """Asks a chat model; all queries of one feature go in one call (the explanation is sent once)."""

    def __init__(self, client: LLMClient, use_logprobs: bool = True) -> None:
        self.client = client
        self.use_logprobs = use_logprobs

    @property
    def name(self) -> str:
        return f"llm:{self.client.model}" + ("+logprobs" if self.use_logprobs and self.client.capabilities.logprobs else "")

    async def _ask(
        self, messages: list[dict[str, str]], lengths: list[int], value_range: tuple[int, int], per_entry_tokens: int
    ) -> Simulation:
        max_tokens = 16 + sum(8 + per_entry_tokens * n for n in lengths)
        result = await self.client.chat(
            messages,
            temperature=0.0,
            max_tokens=max_tokens,
            json_schema=predictions_schema(lengths, value_range),
            logprobs=self.use_logprobs,
        )
        predictions = parse_predictions(result.text, lengths, value_range)
        if self.use_logprobs:
            predictions, _ = apply_logprobs(result.text, predictions, result.logprobs, value_range)
        return Simulation(predictions=predictions, usage=result.usage)

    async def predict_tokens(self, explanation: str, records: list[ActivationRecord]) -> Simulation:
        lengths = [len(r.tokens) for r in records]
        return await self._ask(tls_messages(explanation, records), lengths, TLS_RANGE, per_entry_tokens=3)

    async def predict_segments(self, explanation: str, segmented: list[list[str]]) -> Simulation:
        lengths = [len(s) for s in segmented]
        return await self._ask(sls_messages(explanation, segmented), lengths, SLS_RANGE, per_entry_tokens=3)


_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_TERM_CHARS = re.compile(r"[^\w]+", re.UNICODE)
_WORD = re.compile(r"\S+")
_STOPWORDS = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "will", "with", "fires", "fire", "firing", "feature", "features", "token", "tokens", "text", "texts", "word", "words", "context", "related", "mentions", "about", "such", "like", "when", "which", "who", "what", "how"]
)


def explanation_terms(explanation: str) -> list[str]:
    """The lower-cased words quoted in an explanation (or, with no quotes, its content words)."""
    quoted = [a or b for a, b in _QUOTED.findall(explanation)]
    source = quoted if quoted else [explanation]
    terms: list[str] = []
    for chunk in source:
        for word in chunk.split():
            term = _TERM_CHARS.sub("", word).lower()
            long_enough = len(term) >= (2 if quoted else 4) or (term and not term.isascii())
            if long_enough and term not in _STOPWORDS and term not in terms:
                terms.append(term)
    return terms


def _matches(word: str, terms: list[str]) -> bool:
    word = _TERM_CHARS.sub("", word).lower()
    return bool(word) and any(term == word or (len(term) >= 3 and term in word) for term in terms)


class LexicalSimulator:
    """Offline and deterministic: active where a word of the text contains a quoted term."""

    name = "offline-lexical"

    async def predict_tokens(self, explanation: str, records: list[ActivationRecord]) -> Simulation:
        terms = explanation_terms(explanation)
        predictions: list[list[float] | None] = []
        for record in records:
            text = record.text
            active = [m.span() for m in _WORD.finditer(text) if _matches(m.group(), terms)]
            row = []
            for (a, _), token in zip(token_offsets(record.tokens), record.tokens):
                lead = len(token) - len(token.lstrip())
                core = (a + lead, a + len(token.rstrip()))
                hit = core[0] < core[1] and any(core[0] < end and start < core[1] for start, end in active)
                row.append(10.0 if hit else 0.0)
            predictions.append(row)
        return Simulation(predictions=predictions, usage=Usage())

    async def predict_segments(self, explanation: str, segmented: list[list[str]]) -> Simulation:
        terms = explanation_terms(explanation)
        predictions: list[list[float] | None] = [
            [1.0 if any(_matches(w, terms) for w in text.split()) else 0.0 for text in segments]
            for segments in segmented
        ]
        return Simulation(predictions=predictions, usage=Usage())
