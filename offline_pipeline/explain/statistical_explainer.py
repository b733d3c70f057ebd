"""The offline statistical explainer: a deterministic sentence built from the examples' statistics.

    Drugs: fires on "methamphetamine", "cocaine", "fentanyl" (context: 'how to make ...').

- first, the concept(s) the precision-recall filter tagged the feature with, when given;
- the quoted words are the feature's activating words ranked by lift: how much more often a word is an
  activating word of this feature than it occurs in the corpus (add-one smoothed). Words, not tokens: a
  word activates where any of its tokens does, so a sub-word piece is never shown on its own;
- the context is the most frequent pair of words just before the feature's peak word.

Only the activating words are in double quotes: the offline lexical simulator reads double-quoted
terms as the words the feature fires on, so the context uses single quotes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from offline_pipeline.explain.records import (
    ActivationRecord,
    Explanation,
    FeatureExamples,
    InsufficientExamples,
    token_words,
)

EXPLAINER = "offline-statistical"
EXPLAINER_MODEL = "starmap-lift-v2"


@dataclass(frozen=True)
class StatisticalConfig:
    n_words: int = 3
    activating_fraction: float = 0.25  # a word activates at >= this fraction of the feature's max
    min_support: int = 2  # a word must activate at least this often to be named (relaxed if none does)
    context_width: int = 2  # words before the peak that make the context
    min_context_count: int = 2


def word_counts(records: Iterable[ActivationRecord]) -> Counter[str]:
    """Word frequencies of a set of texts (a background corpus)."""
    counts: Counter[str] = Counter()
    for record in records:
        counts.update(w for w, _ in token_words(record.tokens) if w)
    return counts


def _word_activations(record: ActivationRecord) -> list[tuple[str, float]]:
    return [(word, max(record.activations[i] for i in idx)) for word, idx in token_words(record.tokens)]


class StatisticalExplainer:
    def __init__(self, corpus_counts: Mapping[str, int], config: StatisticalConfig = StatisticalConfig()) -> None:
        self.corpus: Counter[str] = Counter({w: c for w, c in corpus_counts.items() if w})
        self.corpus_total = sum(self.corpus.values())
        self.config = config

    def ranked_words(self, examples: FeatureExamples) -> list[tuple[str, float, int]]:
        """(word, lift, times it activated), best first."""
        threshold = self.config.activating_fraction * examples.max_activation
        active: Counter[str] = Counter()
        for record in examples.activating:
            for word, activation in _word_activations(record):
                if word and activation > 0 and activation >= threshold:
                    active[word] += 1
        if not active:
            return []
        n_active = sum(active.values())
        vocabulary = len(self.corpus) + len(active)

        def lift(word: str) -> float:
            background = (self.corpus[word] + 1) / (self.corpus_total + vocabulary)
            return (active[word] / n_active) / background

        support = self.config.min_support if max(active.values()) >= self.config.min_support else 1
        ranked = [(w, lift(w), c) for w, c in active.items() if c >= support]
        return sorted(ranked, key=lambda item: (-item[1], -item[2], item[0]))

    def context(self, examples: FeatureExamples) -> str | None:
        counts: Counter[str] = Counter()
        for record in examples.activating:
            words = [(w, a) for w, a in _word_activations(record) if w]
            if not words:
                continue
            peak = max(range(len(words)), key=lambda i: words[i][1])
            before = " ".join(w for w, _ in words[max(0, peak - self.config.context_width) : peak])
            if before:
                counts[before] += 1
        best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if best and best[0][1] >= self.config.min_context_count:
            return best[0][0]
        return None

    def describe(self, examples: FeatureExamples) -> str:
        ranked = self.ranked_words(examples)[: self.config.n_words]
        if not ranked:
            raise InsufficientExamples(f"feature {examples.feature_id}: no activating words to explain")
        triggers = ", ".join(f'"{word}"' for word, _, _ in ranked)
        lead = f"{examples.concept[:1].upper()}{examples.concept[1:]}: fires on" if examples.concept else "Fires on"
        context = self.context(examples)
        return f"{lead} {triggers}" + (f" (context: '{context} ...')" if context else "") + "."

    async def explain(self, examples: FeatureExamples) -> Explanation:
        return Explanation(
            feature_id=examples.feature_id,
            text=self.describe(examples),
            explainer=EXPLAINER,
            explainer_model=EXPLAINER_MODEL,
        )
