"""Explaining and scoring many features concurrently, with progress bars and per-feature failures
collected (a failed feature is reported, never silently dropped or given a made-up result)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tqdm import tqdm

from offline_pipeline.explain.llm_client import LLMError
from offline_pipeline.explain.llm_explainer import EmptyExplanation
from offline_pipeline.explain.records import (
    ActivationRecord,
    Explanation,
    FeatureExamples,
    InsufficientExamples,
    Score,
    split_held_out,
)
from offline_pipeline.explain.scoring import ScoringConfig, score_sls, score_tls
from offline_pipeline.explain.simulation import Simulator

METHODS = ("sls", "tls")
# What can go wrong for one feature without being a bug: it is recorded and the run goes on.
FEATURE_FAILURES = (LLMError, EmptyExplanation, InsufficientExamples)

T = TypeVar("T")
R = TypeVar("R")


class Explainer(Protocol):
    async def explain(self, examples: FeatureExamples) -> Explanation: ...


@dataclass
class Outcome:
    results: list = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # feature id -> reason


async def _map(
    items: Sequence[T], key: Callable[[T], str], work: Callable[[T], Awaitable[R]], description: str, progress: bool
) -> Outcome:
    outcome = Outcome()
    bar = tqdm(total=len(items), desc=description, unit="feature", disable=not progress)

    async def one(item: T) -> tuple[str, R | None, str | None]:
        try:
            return key(item), await work(item), None
        except FEATURE_FAILURES as exc:
            return key(item), None, str(exc)
        finally:
            bar.update(1)

    try:
        for feature_id, result, error in await asyncio.gather(*(one(item) for item in items)):
            if error is None:
                outcome.results.append(result)
            else:
                outcome.failures[feature_id] = error
    finally:
        bar.close()
    return outcome


def shown_examples(examples: FeatureExamples, n_per_side: int) -> FeatureExamples:
    """What the explainer may see: everything except the held-out queries (all of it when no split exists)."""
    try:
        return split_held_out(examples, n_per_side).shown
    except InsufficientExamples:
        return examples


async def explain_features(
    explainer: Explainer, features: Sequence[FeatureExamples], n_per_side: int = 5, progress: bool = True
) -> Outcome:
    """Explanations of the features, from the examples that are not held out for scoring."""
    return await _map(
        features,
        key=lambda f: f.feature_id,
        work=lambda f: explainer.explain(shown_examples(f, n_per_side)),
        description="explain",
        progress=progress,
    )


@dataclass
class ScoringJob:
    explanation: Explanation
    examples: FeatureExamples


async def score_explanation(
    explanation: Explanation,
    held_out: list[ActivationRecord],
    simulator: Simulator,
    methods: Sequence[str],
    config: ScoringConfig,
) -> list[Score]:
    """Score one explanation with each method, on the same held-out queries."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown scoring method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
    scores = []
    if "sls" in methods:
        scores.append(await score_sls(explanation.feature_id, explanation.text, held_out, simulator, config))
    if "tls" in methods:
        scores.append(await score_tls(explanation.feature_id, explanation.text, held_out, simulator))
    return scores


async def score_features(
    simulator: Simulator,
    jobs: Sequence[ScoringJob],
    methods: Sequence[str] = METHODS,
    config: ScoringConfig = ScoringConfig(),
    n_per_side: int = 5,
    progress: bool = True,
) -> Outcome:
    """Scores (a list per feature) of each job's explanation on its feature's held-out queries."""

    async def work(job: ScoringJob) -> list[Score]:
        held_out = split_held_out(job.examples, n_per_side).held_out
        return await score_explanation(job.explanation, held_out, simulator, methods, config)

    return await _map(jobs, key=lambda j: j.explanation.feature_id, work=work, description="score", progress=progress)
