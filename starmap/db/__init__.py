"""The StarMap database: SQLAlchemy models, engines, Alembic migrations and full-text search."""

from starmap.db.engine import make_engine, make_sessionmaker
from starmap.db.migrate import upgrade
from starmap.db.models import (
    Base,
    Concept,
    Domain,
    Example,
    Explanation,
    Feature,
    FeatureConcept,
    FeatureDomain,
    Model,
    PipelineRun,
    Sae,
    SaeSet,
    Score,
    SteeringPreset,
    SweepResult,
)
from starmap.db.search import ExplanationHit, search_explanations

__all__ = [
    "Base",
    "Concept",
    "Domain",
    "Example",
    "Explanation",
    "ExplanationHit",
    "Feature",
    "FeatureConcept",
    "FeatureDomain",
    "Model",
    "PipelineRun",
    "Sae",
    "SaeSet",
    "Score",
    "SteeringPreset",
    "SweepResult",
    "make_engine",
    "make_sessionmaker",
    "search_explanations",
    "upgrade",
]
