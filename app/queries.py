"""The database reads of the app: SAE sets, the in-memory feature catalog, feature pages, presets.

Bulk reads select plain columns (no ORM objects): the catalog of a 100k-feature set loads in a
few column scans at start-up, and every request afterwards reads memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, column, func, literal_column, select, table
from sqlalchemy.orm import Session

from app.example_text import example_view
from starmap.db.models import (
    Concept,
    Domain,
    Example,
    Explanation,
    Feature,
    FeatureConcept,
    FeatureDomain,
    Model,
    Monitor,
    RefusalDirection,
    Sae,
    SaeSet,
    Score,
    SteeringPreset,
)
from starmap.db.search import fts5_query, query_words, tsquery

# Which score stands for an explanation when several exist: the paper's segment-level score first.
SCORE_PREFERENCE = ("sls", "release", "tls")


@dataclass(frozen=True)
class SaeInfo:
    layer: int
    hook_name: str
    checkpoint_path: str | None


@dataclass(frozen=True)
class SetInfo:
    id: int
    name: str
    model_name: str
    hook_kind: str
    k: int
    d_sae: int
    origin: str
    saes: tuple[SaeInfo, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.saes)


@dataclass
class FeatureMeta:
    """What the overlay, the map and search need of one feature, kept in memory."""

    feature_id: str
    layer: int
    index: int
    pk: int
    normaliser: float | None
    is_safety: bool
    density: float | None
    umap_x: float | None
    umap_y: float | None
    explanation: str | None = None
    explainer: str | None = None
    score: float | None = None
    score_method: str | None = None
    domains: list[str] = field(default_factory=list)

    @property
    def explained(self) -> bool:
        return self.explanation is not None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.feature_id,
            "layer": self.layer,
            "index": self.index,
            "explanation": self.explanation,
            "explainer": self.explainer,
            "score": self.score,
            "score_method": self.score_method,
            "domains": self.domains,
            "is_safety": self.is_safety,
        }


def sae_sets(session: Session) -> list[SetInfo]:
    rows = session.execute(
        select(SaeSet.id, SaeSet.name, Model.name, SaeSet.hook_kind, SaeSet.k, SaeSet.d_sae, SaeSet.origin)
        .join(Model, Model.id == SaeSet.model_id)
        .order_by(SaeSet.id)
    ).all()
    saes: dict[int, list[SaeInfo]] = defaultdict(list)
    for set_id, layer, hook_name, path in session.execute(
        select(Sae.sae_set_id, Sae.layer, Sae.hook_name, Sae.checkpoint_path).order_by(Sae.sae_set_id, Sae.layer)
    ):
        saes[set_id].append(SaeInfo(layer, hook_name, path))
    return [SetInfo(*row, saes=tuple(saes[row[0]])) for row in rows]


def feature_catalog(session: Session, set_id: int) -> dict[str, FeatureMeta]:
    """Every feature of a set that has an explanation, a domain or a normaliser, by feature id."""
    features: dict[int, FeatureMeta] = {}
    for pk, fid, layer, index, normaliser, is_safety, density, x, y in session.execute(
        select(
            Feature.id, Feature.feature_id, Feature.layer, Feature.index, Feature.normaliser,
            Feature.is_safety, Feature.density, Feature.umap_x, Feature.umap_y,
        ).where(Feature.sae_set_id == set_id)
    ):
        features[pk] = FeatureMeta(fid, layer, index, pk, normaliser, bool(is_safety), density, x, y)

    scores: dict[int, dict[str, float | None]] = defaultdict(dict)
    for explanation_id, method, value in session.execute(
        select(Score.explanation_id, Score.method, Score.value)
        .join(Explanation, Explanation.id == Score.explanation_id)
        .join(Feature, Feature.id == Explanation.feature_id)
        .where(Feature.sae_set_id == set_id)
    ):
        scores[explanation_id].setdefault(method, value)

    # The feature's headline explanation: English first, then the best-scored one.
    best: dict[int, tuple] = {}
    for explanation_id, feature_pk, text, language, explainer in session.execute(
        select(Explanation.id, Explanation.feature_id, Explanation.text, Explanation.language, Explanation.explainer)
        .join(Feature, Feature.id == Explanation.feature_id)
        .where(Feature.sae_set_id == set_id)
    ):
        method, value = _headline_score(scores.get(explanation_id, {}))
        rank = (language == "en", value if value is not None else -1.0, -explanation_id)
        if feature_pk not in best or rank > best[feature_pk][0]:
            best[feature_pk] = (rank, text, explainer, value, method)
    for feature_pk, (_rank, text, explainer, value, method) in best.items():
        meta = features[feature_pk]
        meta.explanation, meta.explainer, meta.score, meta.score_method = text, explainer, value, method

    for feature_pk, domain in session.execute(
        select(FeatureDomain.feature_id, Domain.name)
        .join(Domain, Domain.id == FeatureDomain.domain_id)
        .join(Feature, Feature.id == FeatureDomain.feature_id)
        .where(Feature.sae_set_id == set_id)
        .order_by(FeatureDomain.feature_id, Domain.name)
    ):
        features[feature_pk].domains.append(domain)
    return {meta.feature_id: meta for meta in features.values()}


def _headline_score(by_method: dict[str, float | None]) -> tuple[str | None, float | None]:
    for method in SCORE_PREFERENCE:
        if method in by_method:
            return method, by_method[method]
    for method, value in by_method.items():
        return method, value
    return None, None


def feature_detail(session: Session, feature_pk: int) -> dict[str, Any]:
    """Everything the feature page shows that the catalog does not keep in memory."""
    feature = session.get(Feature, feature_pk)
    if feature is None:
        raise KeyError(feature_pk)
    explanations = []
    for explanation in session.scalars(
        select(Explanation).where(Explanation.feature_id == feature_pk).order_by(Explanation.id)
    ):
        explanations.append({
            "text": explanation.text,
            "language": explanation.language,
            "explainer": explanation.explainer,
            "explainer_model": explanation.explainer_model,
            "scores": [
                {"method": s.method, "value": s.value, "simulator": s.simulator, "n_queries": s.n_queries,
                 "n_parse_failures": s.n_parse_failures}
                for s in sorted(explanation.scores, key=lambda s: s.id)
            ],
        })
    domains = [
        {"name": name, "source": source}
        for name, source in session.execute(
            select(Domain.name, FeatureDomain.source)
            .join(Domain, Domain.id == FeatureDomain.domain_id)
            .where(FeatureDomain.feature_id == feature_pk)
            .order_by(Domain.name)
        )
    ]
    concepts = [
        {"domain": domain, "concept": concept, "precision": precision, "recall": recall, "threshold": threshold}
        for domain, concept, precision, recall, threshold in session.execute(
            select(Domain.name, Concept.name, FeatureConcept.precision, FeatureConcept.recall, FeatureConcept.threshold)
            .join(Concept, Concept.id == FeatureConcept.concept_id)
            .join(Domain, Domain.id == Concept.domain_id)
            .where(FeatureConcept.feature_id == feature_pk)
            .order_by(Domain.name, Concept.name)
        )
    ]
    examples: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for level, rank, tokens, activations, source in session.execute(
        select(Example.level, Example.rank, Example.tokens, Example.activations, Example.source)
        .where(Example.feature_id == feature_pk)
        .order_by(Example.level.desc(), Example.rank)
    ):
        examples[level].append(
            {"rank": rank, "tokens": tokens, "activations": activations, "source": source, **example_view(tokens, activations)}
        )
    return {
        "density": feature.density,
        "max_activation": feature.max_activation,
        "normaliser": feature.normaliser,
        "quantiles": feature.quantiles,
        "histogram": feature.histogram,
        "top_tokens": feature.top_tokens,
        "bottom_tokens": feature.bottom_tokens,
        "umap": None if feature.umap_x is None else [feature.umap_x, feature.umap_y],
        "candidate_only": feature.candidate_only,
        "explanations": explanations,
        "domains": domains,
        "concepts": concepts,
        "examples": [{"level": level, "examples": items} for level, items in examples.items()],
    }


def monitor_rows(session: Session, set_id: int) -> list[dict[str, Any]]:
    """The set's monitors (dense and k-sparse probes) as plain dicts."""
    fields = ("domain", "method", "layer", "representation", "features", "weights", "bias", "calibration")
    return [
        {name: getattr(row, name) for name in fields}
        for row in session.scalars(select(Monitor).where(Monitor.sae_set_id == set_id).order_by(Monitor.domain, Monitor.method))
    ]


def refusal_directions(session: Session, set_id: int) -> dict[int, list[float]]:
    """layer -> the set's refusal direction at that layer (mean at the last prompt token, refused - answered)."""
    rows = session.scalars(select(RefusalDirection).where(RefusalDirection.sae_set_id == set_id))
    return {row.layer: row.direction for row in rows}


def list_presets(session: Session, set_id: int | None = None) -> list[SteeringPreset]:
    statement = select(SteeringPreset).order_by(SteeringPreset.name)
    if set_id is not None:
        statement = statement.where(SteeringPreset.sae_set_id == set_id)
    return list(session.scalars(statement))


def preset_by_name(session: Session, name: str) -> SteeringPreset | None:
    return session.scalar(select(SteeringPreset).where(SteeringPreset.name == name))


def matching_explanations(session: Session, query: str) -> list[int]:
    """Ids of the explanations that contain every word of `query` (as a word prefix), unordered.

    Ranking is left to the caller: bm25 over tens of thousands of matches costs tens of
    milliseconds, while the ids alone come back in a few.
    """
    words = query_words(query)
    if not words:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        fts = table("explanations_fts", column("rowid"), column("explanations_fts"))
        statement = select(fts.c.rowid).where(fts.c.explanations_fts.op("MATCH")(bindparam("fts_query", fts5_query(words))))
    elif dialect == "postgresql":
        simple = literal_column("'simple'::regconfig")  # literal, to match the GIN index expression
        statement = select(Explanation.id).where(
            func.to_tsvector(simple, Explanation.text).op("@@")(func.to_tsquery(simple, bindparam("ts_query", tsquery(words))))
        )
    else:
        raise NotImplementedError(f"full-text search supports SQLite and PostgreSQL, not {dialect}")
    return list(session.scalars(statement))


def explanation_owners(session: Session, set_id: int) -> dict[int, str]:
    """Explanation id -> feature id, for every explanation of a set."""
    return dict(session.execute(
        select(Explanation.id, Feature.feature_id).join(Feature, Feature.id == Explanation.feature_id)
        .where(Feature.sae_set_id == set_id)
    ).all())
