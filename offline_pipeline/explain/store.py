"""Where explanation and scoring read their inputs and write their results: the StarMap database
(`starmap.db`), or JSONL files of the dataclasses in `records.py`.

Database conventions for a feature's `examples` rows: a row with any positive activation is an
activating example at its `level` (0..9) and `rank`; a row whose activations are all zero is a
negative, a hard negative when its `source` is "hard-negative", a random one otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from offline_pipeline.explain.records import (
    N_LEVELS,
    ActivationRecord,
    Explanation,
    FeatureExamples,
    Score,
)
from starmap import db

HARD_NEGATIVE_SOURCE = "hard-negative"
RANDOM_NEGATIVE_SOURCE = "random-negative"

T = TypeVar("T")


def write_jsonl(path: Path, items: Iterable[Any]) -> int:
    """Write dataclasses (or dicts) one JSON object a line; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            data = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
            handle.write(json.dumps(data, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path, kind: type[T]) -> list[T]:
    """Read a JSONL file of `kind` (FeatureExamples, Explanation or Score); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    items = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                items.append(kind.from_dict(data) if hasattr(kind, "from_dict") else kind(**data))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not a {kind.__name__}: {exc}") from None
    return items


@dataclass
class FeatureSelection:
    sae_set: str | None = None  # a set name; None: every set
    layers: list[int] = field(default_factory=list)
    feature_ids: list[str] = field(default_factory=list)  # "{layer}_{index}"
    safety_only: bool = False
    limit: int | None = None


def _output_tokens(value: Any) -> list[str]:
    """Top output tokens stored as a list of strings, of [token, value] pairs or of {"token": ...}."""
    tokens = []
    for item in value or []:
        if isinstance(item, str):
            tokens.append(item)
        elif isinstance(item, (list, tuple)) and item:
            tokens.append(str(item[0]))
        elif isinstance(item, dict) and "token" in item:
            tokens.append(str(item["token"]))
    return tokens


def select_features(session: Session, selection: FeatureSelection) -> list[db.Feature]:
    query = select(db.Feature).order_by(db.Feature.sae_set_id, db.Feature.layer, db.Feature.index)
    if selection.sae_set is not None:
        query = query.join(db.SaeSet, db.SaeSet.id == db.Feature.sae_set_id).where(db.SaeSet.name == selection.sae_set)
    if selection.layers:
        query = query.where(db.Feature.layer.in_(selection.layers))
    if selection.feature_ids:
        query = query.where(db.Feature.feature_id.in_(selection.feature_ids))
    if selection.safety_only:
        query = query.where(db.Feature.is_safety.is_(True))
    query = query.where(select(db.Example.id).where(db.Example.feature_id == db.Feature.id).exists())
    if selection.limit is not None:
        query = query.limit(selection.limit)
    return list(session.scalars(query))


def feature_examples(session: Session, feature: db.Feature) -> FeatureExamples | None:
    """The feature's examples as `FeatureExamples`; None when it has no activating example."""
    rows = session.scalars(
        select(db.Example).where(db.Example.feature_id == feature.id).order_by(db.Example.level, db.Example.rank)
    ).all()
    levels: list[list[ActivationRecord]] = [[] for _ in range(N_LEVELS)]
    hard, random = [], []
    for row in rows:
        record = ActivationRecord.from_dict({"tokens": row.tokens, "activations": row.activations})
        if record.max_activation > 0:
            if not 0 <= row.level < N_LEVELS:
                raise ValueError(f"examples row {row.id} of feature {feature.feature_id}: level {row.level} not in 0..9")
            levels[row.level].append(record)
        elif row.source == HARD_NEGATIVE_SOURCE:
            hard.append(record)
        else:
            random.append(record)
    peak = max((r.max_activation for level in levels for r in level), default=0.0)
    if peak <= 0:
        return None
    concepts = session.execute(
        select(db.Concept.name)
        .join(db.FeatureConcept, db.FeatureConcept.concept_id == db.Concept.id)
        .where(db.FeatureConcept.feature_id == feature.id)
        .order_by(db.FeatureConcept.precision.desc())
    ).scalars().all()
    return FeatureExamples(
        feature_id=feature.feature_id,
        max_activation=max(feature.max_activation or 0.0, peak),
        levels=levels,
        hard_negatives=hard,
        top_output_tokens=_output_tokens(feature.top_tokens),
        concept=concepts[0] if concepts else None,
        random_negatives=random,
    )


def save_explanation(session: Session, feature: db.Feature, explanation: Explanation) -> db.Explanation:
    row = db.Explanation(
        feature_id=feature.id,
        text=explanation.text,
        language=explanation.language,
        explainer=explanation.explainer,
        explainer_model=explanation.explainer_model,
        input_tokens=explanation.input_tokens,
        output_tokens=explanation.output_tokens,
    )
    session.add(row)
    return row


def has_explanation(session: Session, feature: db.Feature, explainer: str, explainer_model: str) -> bool:
    query = select(db.Explanation.id).where(
        db.Explanation.feature_id == feature.id,
        db.Explanation.explainer == explainer,
        db.Explanation.explainer_model == explainer_model,
    )
    return session.scalar(query.limit(1)) is not None


def latest_explanation(session: Session, feature: db.Feature, explainer: str | None = None) -> db.Explanation | None:
    """The newest explanation of a feature (optionally by one explainer); release explanations are never re-scored."""
    query = select(db.Explanation).where(db.Explanation.feature_id == feature.id, db.Explanation.explainer != "release")
    if explainer is not None:
        query = query.where(db.Explanation.explainer == explainer)
    return session.scalar(query.order_by(db.Explanation.created_at.desc(), db.Explanation.id.desc()).limit(1))


def as_explanation(row: db.Explanation, feature: db.Feature) -> Explanation:
    return Explanation(
        feature_id=feature.feature_id,
        text=row.text,
        explainer=row.explainer,
        explainer_model=row.explainer_model or "",
        input_tokens=row.input_tokens or 0,
        output_tokens=row.output_tokens or 0,
        language=row.language,
    )


def has_score(session: Session, explanation: db.Explanation, method: str, simulator: str) -> bool:
    query = select(db.Score.id).where(
        db.Score.explanation_id == explanation.id, db.Score.method == method, db.Score.simulator == simulator
    )
    return session.scalar(query.limit(1)) is not None


def save_score(session: Session, explanation: db.Explanation, score: Score) -> db.Score:
    row = db.Score(
        explanation_id=explanation.id,
        method=score.method,
        value=score.value,
        simulator=score.simulator,
        n_queries=score.n_queries,
        n_parse_failures=score.n_parse_failures,
        input_tokens=score.input_tokens,
        output_tokens=score.output_tokens,
    )
    session.add(row)
    return row
