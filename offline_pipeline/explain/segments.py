"""Cutting a query into segments at word boundaries, and mapping tokens onto them.

tokens -> character offsets (the tokens' strings concatenate to the text) -> words (runs of
non-space characters) -> n segments of consecutive words, as equal in word count as possible
(the first segments take the remainder). Whitespace belongs to the segment before it. A token
belongs to every segment its non-space characters touch (a whitespace-only token to the segment
where it starts), so a segment's true activation is the max over the tokens that overlap it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from offline_pipeline.explain.records import ActivationRecord

N_SEGMENTS = 8
_WORD = re.compile(r"\S+")


def decode_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """Token strings whose concatenation is exactly `tokenizer.decode(ids)`, by decoding incrementally.

    A token that ends inside a multi-byte character contributes "" and the character goes to the
    token that completes it.
    """
    pieces: list[str] = []
    previous = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if (text.endswith("\ufffd") and end < len(ids)) or not text.startswith(previous):
            pieces.append("")
            continue
        pieces.append(text[len(previous) :])
        previous = text
    return pieces


def token_offsets(tokens: list[str]) -> list[tuple[int, int]]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append((position, position + len(token)))
        position += len(token)
    return offsets


@dataclass
class Segmentation:
    texts: list[str]  # the segments' text, in order; "".join(texts) is the query
    token_segments: list[list[int]]  # for each token, the segments it belongs to

    @property
    def n_segments(self) -> int:
        return len(self.texts)

    def segment_max(self, activations: list[float]) -> list[float]:
        best = [0.0] * self.n_segments
        for activation, segments in zip(activations, self.token_segments, strict=True):
            for s in segments:
                best[s] = max(best[s], activation)
        return best


def segment(record: ActivationRecord, n_segments: int = N_SEGMENTS) -> Segmentation:
    """Cut a record into min(n_segments, number of words) segments at word boundaries."""
    if n_segments < 1:
        raise ValueError("n_segments must be at least 1")
    text = record.text
    words = [m.span() for m in _WORD.finditer(text)]
    n = min(n_segments, len(words))
    if n == 0:
        return Segmentation(texts=[], token_segments=[[] for _ in record.tokens])
    base, extra = divmod(len(words), n)
    first_words, position = [], 0
    for s in range(n):
        first_words.append(position)
        position += base + (1 if s < extra else 0)
    starts = [0] + [words[w][0] for w in first_words[1:]]
    ends = [*starts[1:], len(text)]
    texts = [text[a:b] for a, b in zip(starts, ends)]

    def segment_at(char: int) -> int:
        return bisect.bisect_right(starts, char) - 1

    token_segments = []
    for (a, b), token in zip(token_offsets(record.tokens), record.tokens):
        stripped = token.strip()
        if not stripped or a == b:
            token_segments.append([segment_at(min(a, len(text) - 1))] if text else [])
            continue
        first = a + token.index(stripped[0])
        last = a + len(token.rstrip()) - 1
        token_segments.append(list(range(segment_at(first), segment_at(last) + 1)))
    return Segmentation(texts=texts, token_segments=token_segments)
