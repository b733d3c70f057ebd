"""What the explainers and scorers take and give: plain dataclasses that the pipeline fills from SAE
activations (or the CLI reads from the database / a JSONL file).

Activation levels follow the paper: the range [0, max activation] of a feature is cut into 10 equal
intervals, and an example belongs to the level of its own maximum activation (level 9 = strongest).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

N_LEVELS = 10


@dataclass
class ActivationRecord:
    """One text as token strings (their concatenation is the text) with one activation per token."""

    tokens: list[str]
    activations: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(
                f"ActivationRecord: {len(self.tokens)} tokens but {len(self.activations)} activations"
            )
        if any(not math.isfinite(a) for a in self.activations):
            raise ValueError("ActivationRecord: activations must be finite")

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationRecord:
        return cls(tokens=[str(t) for t in data["tokens"]], activations=[float(a) for a in data["activations"]])


@dataclass
class FeatureExamples:
    """Everything the explainers and scorers know about one feature.

    `levels[i]` holds activating records whose maximum lies in the i-th tenth of `max_activation`
    (`levels[9]` the strongest), strongest first. `hard_negatives` do not activate but contain the
    feature's top activating tokens; `random_negatives` are non-activating texts drawn at random.
    """

    feature_id: str
    max_activation: float
    levels: list[list[ActivationRecord]]
    hard_negatives: list[ActivationRecord] = field(default_factory=list)
    top_output_tokens: list[str] = field(default_factory=list)
    concept: str | None = None
    random_negatives: list[ActivationRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.levels) != N_LEVELS:
            raise ValueError(f"FeatureExamples {self.feature_id}: expected {N_LEVELS} levels, got {len(self.levels)}")
        if not (math.isfinite(self.max_activation) and self.max_activation > 0):
            raise ValueError(f"FeatureExamples {self.feature_id}: max_activation must be a positive number")

    @property
    def activating(self) -> list[ActivationRecord]:
        return [record for level in reversed(self.levels) for record in level]

    @property
    def negatives(self) -> list[ActivationRecord]:
        return [*self.hard_negatives, *self.random_negatives]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureExamples:
        def records(key: str) -> list[ActivationRecord]:
            return [ActivationRecord.from_dict(r) for r in data.get(key) or []]

        try:
            return cls(
                feature_id=str(data["feature_id"]),
                max_activation=float(data["max_activation"]),
                levels=[[ActivationRecord.from_dict(r) for r in level] for level in data["levels"]],
                hard_negatives=records("hard_negatives"),
                top_output_tokens=[str(t) for t in data.get("top_output_tokens") or []],
                concept=data.get("concept"),
                random_negatives=records("random_negatives"),
            )
        except KeyError as exc:
            raise ValueError(f"FeatureExamples record is missing the field {exc.args[0]!r}") from None


@dataclass
class Explanation:
    feature_id: str
    text: str
    explainer: str  # "llm" or "offline-statistical"
    explainer_model: str
    input_tokens: int = 0
    output_tokens: int = 0
    language: str = "en"


@dataclass
class Score:
    """A simulation score. `value` is None when Pearson's r is undefined (constant truth or prediction)."""

    feature_id: str
    method: str  # "sls" or "tls"
    value: float | None
    simulator: str
    n_queries: int
    n_parse_failures: int
    input_tokens: int
    output_tokens: int
    n_units: int = 0  # tokens (TLS) or segments (SLS) that entered the correlation


def activation_level(value: float, max_activation: float, n_levels: int = N_LEVELS) -> int:
    """The level (0 .. n_levels-1) of an activation: linear interpolation of the feature's max."""
    if max_activation <= 0:
        raise ValueError("max_activation must be positive")
    return min(n_levels - 1, max(0, int(n_levels * value / max_activation)))


def stratify(
    records: Iterable[ActivationRecord], max_activation: float, per_level: int | None = None
) -> list[list[ActivationRecord]]:
    """Activating records grouped by level, strongest first within a level (non-activating ones dropped)."""
    levels: list[list[ActivationRecord]] = [[] for _ in range(N_LEVELS)]
    for record in records:
        if record.max_activation > 0:
            levels[activation_level(record.max_activation, max_activation)].append(record)
    for level in levels:
        level.sort(key=lambda r: -r.max_activation)
    return [level[:per_level] if per_level is not None else level for level in levels]


def normalise_token(token: str) -> str:
    return token.strip().lower()


_EDGE_PUNCTUATION = re.compile(r"^[^\w]+|[^\w]+$")


def token_words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(word, indices of its tokens) for a tokenised text: a token continues the word before it unless it
    starts with whitespace or follows a token that ends in punctuation. Words are lower-cased with edge
    punctuation stripped ("" for punctuation alone), so sub-word pieces never stand for a word."""
    words: list[tuple[str, list[int]]] = []
    for i, token in enumerate(tokens):
        starts = not words or token[:1].isspace() or not tokens[i - 1][-1:].isalnum()
        if starts:
            words.append((token, [i]))
        else:
            words[-1] = (words[-1][0] + token, [*words[-1][1], i])
    return [(_EDGE_PUNCTUATION.sub("", w.strip().lower()), idx) for w, idx in words]


def top_activating_tokens(records: Iterable[ActivationRecord], n: int = 5) -> list[str]:
    """The normalised tokens that carry each record's maximum, most frequent first."""
    counts: dict[str, int] = {}
    for record in records:
        if record.max_activation <= 0:
            continue
        token = normalise_token(record.tokens[record.activations.index(record.max_activation)])
        if token:
            counts[token] = counts.get(token, 0) + 1
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def select_hard_negatives(
    activating: Sequence[ActivationRecord], candidates: Iterable[ActivationRecord], n: int, n_top_tokens: int = 5
) -> list[ActivationRecord]:
    """Non-activating candidates that contain the feature's top activating tokens, most shared tokens first."""
    top = set(top_activating_tokens(activating, n_top_tokens))
    scored = []
    for order, record in enumerate(candidates):
        if record.max_activation > 0:
            continue
        shared = len(top & {normalise_token(t) for t in record.tokens})
        if shared:
            scored.append((-shared, order, record))
    return [record for *_, record in sorted(scored, key=lambda s: s[:2])[:n]]


class InsufficientExamples(ValueError):
    """A feature has no activating or no non-activating examples to hold out."""


@dataclass
class HeldOutSplit:
    shown: FeatureExamples  # what the explainer sees
    held_out: list[ActivationRecord]  # what the scorers simulate: half activating, half not
    n_activating: int


def split_held_out(examples: FeatureExamples, n_per_side: int = 5) -> HeldOutSplit:
    """Hold out queries for scoring, deterministically, disjoint from what the explainer is shown.

    Activating records are ordered strongest level first; every second one is a held-out candidate
    (so a level with several records gives about half, and single-record levels alternate), and up
    to `n_per_side` candidates are taken round-robin over the levels, strongest first, so all levels
    are represented. As many non-activating queries are held out: random negatives first, then every
    second hard negative. Whatever is not held out is shown to the explainer.
    """
    flat = [(level, record) for level in reversed(range(N_LEVELS)) for record in examples.levels[level]]
    by_level: dict[int, list[ActivationRecord]] = {}
    for level, record in flat[1::2]:
        by_level.setdefault(level, []).append(record)
    negatives = [*examples.random_negatives, *examples.hard_negatives[1::2]]
    wanted = min(n_per_side, len(negatives))
    activating: list[ActivationRecord] = []
    depth = 0
    while len(activating) < wanted and any(depth < len(rs) for rs in by_level.values()):
        for level in sorted(by_level, reverse=True):
            if depth < len(by_level[level]) and len(activating) < wanted:
                activating.append(by_level[level][depth])
        depth += 1
    if not activating or not negatives:
        raise InsufficientExamples(
            f"feature {examples.feature_id}: need held-out activating and non-activating examples, "
            f"have {len(flat[1::2])} and {len(negatives)}"
        )
    negatives = negatives[: len(activating)]
    held = {id(r) for r in [*activating, *negatives]}
    shown = FeatureExamples(
        feature_id=examples.feature_id,
        max_activation=examples.max_activation,
        levels=[[r for r in level if id(r) not in held] for level in examples.levels],
        hard_negatives=[r for r in examples.hard_negatives if id(r) not in held],
        top_output_tokens=examples.top_output_tokens,
        concept=examples.concept,
    )
    return HeldOutSplit(shown=shown, held_out=[*activating, *negatives], n_activating=len(activating))
