"""Read helpers shared by the server's pages: features by their `"{layer}_{index}"` id, each with its best
explanation, score and domain tags, in a fixed number of queries however many features are asked for."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from starmap.db.models import Domain, Explanation, Feature, FeatureDomain, Score

_CHUNK = 5000


@dataclass(frozen=True)
class ExplanationSummary:
    text: str
    language: str
    explainer: str
    score: float | None
    score_method: str | None


def feature_by_id(session: Session, sae_set_id: int, feature_id: str) -> Feature | None:
    return session.scalar(select(Feature).where(Feature.sae_set_id == sae_set_id, Feature.feature_id == feature_id))


def features_for_ids(session: Session, sae_set_id: int, feature_ids: Iterable[str]) -> dict[str, Feature]:
    """The features of a set by `"{layer}_{index}"` id; ids the set lacks are absent from the result."""
    wanted = list(dict.fromkeys(feature_ids))
    found: dict[str, Feature] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        statement = select(Feature).where(Feature.sae_set_id == sae_set_id, Feature.feature_id.in_(chunk))
        found.update((feature.feature_id, feature) for feature in session.scalars(statement))
    return found


def best_explanations(
    session: Session, feature_pks: Iterable[int], language: str = "en"
) -> dict[int, ExplanationSummary]:
    """Per feature (by primary key): its explanation in `language` if it has one, else in any language;
    among those, the best scored (an unscored or undefined score ranks last)."""
    best: dict[int, tuple[tuple, ExplanationSummary]] = {}
    for chunk in _chunks(feature_pks):
        rows = session.execute(
            select(
                Explanation.feature_id,
                Explanation.id,
                Explanation.text,
                Explanation.language,
                Explanation.explainer,
                Score.value,
                Score.method,
            )
            .outerjoin(Score, Score.explanation_id == Explanation.id)
            .where(Explanation.feature_id.in_(chunk))
        )
        for feature_pk, explanation_id, text, row_language, explainer, value, method in rows:
            rank = (row_language == language, value is not None, value if value is not None else 0.0, -explanation_id)
            if feature_pk not in best or rank > best[feature_pk][0]:
                best[feature_pk] = (rank, ExplanationSummary(text, row_language, explainer, value, method))
    return {feature_pk: summary for feature_pk, (_, summary) in best.items()}


def domains_of(session: Session, feature_pks: Iterable[int]) -> dict[int, list[str]]:
    """Per feature (by primary key) its domain names, sorted; features without a domain are absent."""
    domains: dict[int, list[str]] = {}
    for chunk in _chunks(feature_pks):
        rows = session.execute(
            select(FeatureDomain.feature_id, Domain.name)
            .join(Domain, Domain.id == FeatureDomain.domain_id)
            .where(FeatureDomain.feature_id.in_(chunk))
            .order_by(FeatureDomain.feature_id, Domain.name)
        )
        for feature_pk, name in rows:
            domains.setdefault(feature_pk, []).append(name)
    return domains


def _chunks(values: Iterable[int]) -> Iterable[list[int]]:
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), _CHUNK):
        yield unique[start : start + _CHUNK]
