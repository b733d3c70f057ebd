"""The StarMap database schema (SQLAlchemy 2.0 declarative models).

The schema itself is created and changed only by the Alembic migrations in `migrations/`
(`starmap.db.migrate.upgrade(url)`), which also add what the ORM cannot express: the
full-text index over `explanations.text` (`explanations_fts` on SQLite, a GIN index on
PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so that later migrations can alter them on both dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    """A language model whose activations the SAEs read."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    n_layers: Mapped[int]
    d_model: Mapped[int]
    source: Mapped[str | None] = mapped_column(String(255))

    sae_sets: Mapped[list[SaeSet]] = relationship(back_populates="model", passive_deletes=True)


class SaeSet(Base):
    """SAEs of one model trained (or released) together: one hook kind, one k, one width."""

    __tablename__ = "sae_sets"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    hook_kind: Mapped[str] = mapped_column(String(32))
    k: Mapped[int]
    expansion: Mapped[int]
    d_sae: Mapped[int]
    origin: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="sae_sets")
    saes: Mapped[list[Sae]] = relationship(back_populates="sae_set", passive_deletes=True)


class Sae(Base):
    """One SAE: a hook point of the set's model."""

    __tablename__ = "saes"
    __table_args__ = (
        UniqueConstraint("sae_set_id", "hook_name"),
        Index("ix_saes_sae_set_id_layer", "sae_set_id", "layer"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_set_id: Mapped[int] = mapped_column(ForeignKey("sae_sets.id", ondelete="CASCADE"))
    layer: Mapped[int]
    hook_name: Mapped[str] = mapped_column(String(128))
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]

    sae_set: Mapped[SaeSet] = relationship(back_populates="saes")


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class Concept(Base):
    __tablename__ = "concepts"
    __table_args__ = (UniqueConstraint("domain_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))

    domain: Mapped[Domain] = relationship()


class Feature(Base):
    """One SAE latent, identified as `"{layer}_{index}"` within its SAE set."""

    __tablename__ = "features"
    __table_args__ = (
        UniqueConstraint("sae_set_id", "feature_id"),
        UniqueConstraint("sae_id", "index"),
        Index("ix_features_sae_set_id_layer", "sae_set_id", "layer"),
        Index("ix_features_sae_set_id_is_safety", "sae_set_id", "is_safety"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    sae_set_id: Mapped[int] = mapped_column(ForeignKey("sae_sets.id", ondelete="CASCADE"))
    layer: Mapped[int]
    index: Mapped[int] = mapped_column("index", Integer)
    feature_id: Mapped[str] = mapped_column(String(32))
    density: Mapped[float | None] = mapped_column(Float)
    max_activation: Mapped[float | None] = mapped_column(Float)
    # Divide a raw activation by this to get the normalised activation (~ the 0.999 quantile).
    normaliser: Mapped[float | None] = mapped_column(Float)
    quantiles: Mapped[dict[str, Any] | None]
    histogram: Mapped[dict[str, Any] | None]
    top_tokens: Mapped[list[Any] | None]
    bottom_tokens: Mapped[list[Any] | None]
    umap_x: Mapped[float | None] = mapped_column(Float)
    umap_y: Mapped[float | None] = mapped_column(Float)
    is_safety: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A candidate of a safety filter that was not explained (e.g. the Safe-SAIL release's
    # `indices_layer{L}.pt` entries missing from its database); such features have no explanation.
    candidate_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    sae: Mapped[Sae] = relationship()
    explanations: Mapped[list[Explanation]] = relationship(back_populates="feature", passive_deletes=True)
    domains: Mapped[list[FeatureDomain]] = relationship(back_populates="feature", passive_deletes=True)


class FeatureDomain(Base):
    __tablename__ = "feature_domains"

    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"), primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True, index=True)
    source: Mapped[str] = mapped_column(String(32))

    feature: Mapped[Feature] = relationship(back_populates="domains")
    domain: Mapped[Domain] = relationship()


class FeatureConcept(Base):
    __tablename__ = "feature_concepts"

    id: Mapped[int] = mapped_column(primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"), index=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)


class Example(Base):
    """A top-activating context of a feature at one of 10 activation levels."""

    __tablename__ = "examples"
    __table_args__ = (Index("ix_examples_feature_id_level_rank", "feature_id", "level", "rank"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    level: Mapped[int]
    rank: Mapped[int]
    tokens: Mapped[list[Any]]
    activations: Mapped[list[Any]]
    source: Mapped[str | None] = mapped_column(String(255))


class Explanation(Base):
    __tablename__ = "explanations"
    __table_args__ = (Index("ix_explanations_feature_id_language", "feature_id", "language"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    language: Mapped[str] = mapped_column(String(16))
    explainer: Mapped[str] = mapped_column(String(32))
    explainer_model: Mapped[str | None] = mapped_column(String(255))
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    feature: Mapped[Feature] = relationship(back_populates="explanations")
    scores: Mapped[list[Score]] = relationship(back_populates="explanation", passive_deletes=True)


class Score(Base):
    __tablename__ = "scores"

    id: Mapped[int] = mapped_column(primary_key=True)
    explanation_id: Mapped[int] = mapped_column(ForeignKey("explanations.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    # NULL when undefined (a constant simulation has no Pearson correlation), never a made-up 0.
    value: Mapped[float | None] = mapped_column(Float)
    simulator: Mapped[str | None] = mapped_column(String(255))
    n_queries: Mapped[int | None]
    n_parse_failures: Mapped[int | None]
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]

    explanation: Mapped[Explanation] = relationship(back_populates="scores")


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_key: Mapped[str] = mapped_column(String(128), unique=True)
    preset: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]]
    chosen_config: Mapped[dict[str, Any] | None]
    selection_rule: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(32))


class SweepResult(Base):
    """One pre-explanation metric of one SAE configuration (the config-selection sweep)."""

    __tablename__ = "sweep_results"
    __table_args__ = (Index("ix_sweep_results_run_id_metric", "run_id", "metric"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"))
    hook_kind: Mapped[str] = mapped_column(String(32))
    k: Mapped[int]
    layer: Mapped[int]
    domain: Mapped[str | None] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    threshold: Mapped[float | None] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)


class SteeringPreset(Base):
    __tablename__ = "steering_presets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    sae_set_id: Mapped[int] = mapped_column(ForeignKey("sae_sets.id", ondelete="CASCADE"), index=True)
    interventions: Mapped[list[Any]]
    description: Mapped[str | None] = mapped_column(Text)
    figures: Mapped[dict[str, Any] | None]
    example: Mapped[str | None] = mapped_column(Text)


class Monitor(Base):
    """A detector of harmful requests for one domain (or "any"): a dense probe on one hooked layer, or a
    k-sparse probe on SAE features; `logit = weights . x + bias`, `p = sigmoid(a * logit + b)`."""

    __tablename__ = "monitors"
    __table_args__ = (UniqueConstraint("sae_set_id", "domain", "method"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_set_id: Mapped[int] = mapped_column(ForeignKey("sae_sets.id", ondelete="CASCADE"), index=True)
    domain: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    layer: Mapped[int | None]
    representation: Mapped[str | None] = mapped_column(String(16))
    features: Mapped[list[Any] | None]
    weights: Mapped[list[Any]]
    bias: Mapped[float] = mapped_column(Float)
    calibration: Mapped[list[Any]]
    auroc_validation: Mapped[float | None] = mapped_column(Float)
    n_train: Mapped[int]
    n_validation: Mapped[int]


class RefusalDirection(Base):
    """Mean activation at the last prompt token of refused minus answered prompts, at one hooked layer."""

    __tablename__ = "refusal_directions"
    __table_args__ = (UniqueConstraint("sae_set_id", "layer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_set_id: Mapped[int] = mapped_column(ForeignKey("sae_sets.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int]
    hook_name: Mapped[str] = mapped_column(String(128))
    direction: Mapped[list[Any]]
    norm: Mapped[float] = mapped_column(Float)
    n_refused: Mapped[int]
    n_answered: Mapped[int]
