"""The offline statistical explainer: a deterministic sentence built from the examples' statistics.

    Fires on "bomb", "explosive", "detonat" (weapons; context: 'build a ...'; promotes 'explos', 'weapon').

- the quoted tokens are the activating tokens ranked by lift: how much more often a token is an
  activating token of this feature than it occurs in the corpus (add-one smoothed);
- the concept is the one the precision-recall filter matched, when given;
- the context is the most frequent n-gram of tokens just before the feature's peak;
- "promotes" lists the feature's top output tokens (given).

Only the activating tokens are in double quotes: the offline lexical simulator reads double-quoted
terms as the words the feature fires on, so context and output tokens use single quotes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from offline_pipeline.explain.records import (
    ActivationRecord,
    Explanation,
    FeatureExamples,
    InsufficientExamples,
    normalise_token,
)

EXPLAINER = "offline-statistical"
EXPLAINER_MODEL = "starmap-lift-v1"


@dataclass(frozen=True)
class StatisticalConfig:
    n_tokens: int = 3
    activating_fraction: float = 0.25  # a token activates at >= this fraction of the feature's max
    min_support: int = 2  # a token must activate at least this often to be named (relaxed if none does)
    context_width: int = 2  # tokens before the peak that make the context n-gram
    min_context_count: int = 2
    n_output_tokens: int = 2


def token_counts(records: Iterable[ActivationRecord]) -> Counter[str]:
    """Normalised token frequencies of a set of texts (a background corpus)."""
    counts: Counter[str] = Counter()
    for record in records:
        counts.update(t for t in map(normalise_token, record.tokens) if t)
    return counts


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class StatisticalExplainer:
    def __init__(self, corpus_counts: Mapping[str, int], config: StatisticalConfig = StatisticalConfig()) -> None:
        self.corpus: Counter[str] = Counter()
        for token, count in corpus_counts.items():
            if normalise_token(token):
                self.corpus[normalise_token(token)] += count
        self.corpus_total = sum(self.corpus.values())
        self.config = config

    def ranked_tokens(self, examples: FeatureExamples) -> list[tuple[str, float, int]]:
        """(token, lift, times it activated), best first."""
        threshold = self.config.activating_fraction * examples.max_activation
        active: Counter[str] = Counter()
        for record in examples.activating:
            for token, activation in zip(record.tokens, record.activations):
                if activation > 0 and activation >= threshold and normalise_token(token):
                    active[normalise_token(token)] += 1
        if not active:
            return []
        n_active = sum(active.values())
        vocabulary = len(self.corpus) + len(active)

        def lift(token: str) -> float:
            background = (self.corpus[token] + 1) / (self.corpus_total + vocabulary)
            return (active[token] / n_active) / background

        support = self.config.min_support if max(active.values()) >= self.config.min_support else 1
        ranked = [(t, lift(t), c) for t, c in active.items() if c >= support]
        return sorted(ranked, key=lambda item: (-item[1], -item[2], item[0]))

    def context(self, examples: FeatureExamples) -> str | None:
        counts: Counter[str] = Counter()
        for record in examples.activating:
            peak = record.activations.index(record.max_activation)
            before = _squash("".join(record.tokens[max(0, peak - self.config.context_width) : peak]))
            if before:
                counts[before] += 1
        best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if best and best[0][1] >= self.config.min_context_count:
            return best[0][0]
        return None

    def describe(self, examples: FeatureExamples) -> str:
        ranked = self.ranked_tokens(examples)[: self.config.n_tokens]
        if not ranked:
            raise InsufficientExamples(f"feature {examples.feature_id}: no activating tokens to explain")
        # A token that is itself a double quote cannot be double-quoted; it is named in single quotes.
        triggers = ", ".join(f"'{token}'" if '"' in token else f'"{token}"' for token, _, _ in ranked)
        details = []
        if examples.concept:
            details.append(examples.concept)
        context = self.context(examples)
        if context:
            details.append(f"context: '{context} ...'")
        outputs = [t.strip() for t in examples.top_output_tokens if t.strip()][: self.config.n_output_tokens]
        if outputs:
            details.append("promotes " + ", ".join(f"'{t}'" for t in outputs))
        return f"Fires on {triggers}" + (f" ({'; '.join(details)})" if details else "") + "."

    async def explain(self, examples: FeatureExamples) -> Explanation:
        return Explanation(
            feature_id=examples.feature_id,
            text=self.describe(examples),
            explainer=EXPLAINER,
            explainer_model=EXPLAINER_MODEL,
        )
