"""Simulation scores of an explanation on held-out queries: TLS (token level) and SLS (segment level).

- TLS: the simulator predicts 0-10 for every token; the score is Pearson's r between the true
  activations and the predictions, pooled over all tokens of all held-out queries.
- SLS (the paper's): every query is cut into n = 8 segments at word boundaries (fewer when it has
  fewer words). A segment's truth is 1 when the feature's maximum activation inside it exceeds a
  threshold, 0 otherwise; the simulator answers 0/1 per segment; the score is Pearson's r pooled
  over all (query, segment) pairs.

  The threshold is `threshold_fraction` (default 0.5) times the largest activation in the held-out
  set. It is relative to the held-out set rather than to the feature's corpus maximum because the
  held-out queries are a stratified sample: with the corpus maximum, a feature whose held-out
  activating queries happen to come from low levels would have no "1" segments at all. Half the
  held-out maximum separates the clearly-firing segments from weak spill-over.

A query whose answer failed to parse is left out of the correlation and counted; it is never
scored as 0. When the truth or the predictions are constant, r is undefined and the score is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline_pipeline.explain.records import ActivationRecord, Score
from offline_pipeline.explain.segments import N_SEGMENTS, segment
from offline_pipeline.explain.simulation import Simulation, Simulator


@dataclass(frozen=True)
class ScoringConfig:
    n_segments: int = N_SEGMENTS
    threshold_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.n_segments < 1:
            raise ValueError("n_segments must be at least 1")
        if not 0 <= self.threshold_fraction < 1:
            raise ValueError("threshold_fraction must be in [0, 1)")


def pearson(truth: list[float], predicted: list[float]) -> float | None:
    """Pearson's r, or None where it is undefined (fewer than two points, or a constant side)."""
    if len(truth) != len(predicted):
        raise ValueError(f"pearson: {len(truth)} true values but {len(predicted)} predictions")
    if len(truth) < 2:
        return None
    x, y = np.asarray(truth, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if denominator == 0.0 or not np.isfinite(denominator):
        return None
    return float(np.clip((x * y).sum() / denominator, -1.0, 1.0))


def segment_truth(records: list[ActivationRecord], config: ScoringConfig) -> tuple[list[list[str]], list[list[float]]]:
    """Each query's segment texts and 0/1 truths (threshold: a fraction of the held-out maximum)."""
    threshold = config.threshold_fraction * max((r.max_activation for r in records), default=0.0)
    texts, truths = [], []
    for record in records:
        segmentation = segment(record, config.n_segments)
        texts.append(segmentation.texts)
        truths.append([1.0 if m > threshold else 0.0 for m in segmentation.segment_max(record.activations)])
    return texts, truths


async def score_tls(feature_id: str, explanation: str, held_out: list[ActivationRecord], simulator: Simulator) -> Score:
    simulation = await simulator.predict_tokens(explanation, held_out)
    truths = [record.activations for record in held_out]
    return _pooled_score(feature_id, "tls", truths, simulation, simulator.name)


async def score_sls(
    feature_id: str,
    explanation: str,
    held_out: list[ActivationRecord],
    simulator: Simulator,
    config: ScoringConfig = ScoringConfig(),
) -> Score:
    texts, truths = segment_truth(held_out, config)
    # A query without words has no segment to ask about.
    asked = [i for i, t in enumerate(texts) if t]
    simulation = await simulator.predict_segments(explanation, [texts[i] for i in asked])
    return _pooled_score(feature_id, "sls", [truths[i] for i in asked], simulation, simulator.name)


def _pooled_score(feature_id: str, method: str, truths: list[list[float]], simulation: Simulation, simulator: str) -> Score:
    """Pearson's r pooled over every unit (token or segment) of the queries whose answer parsed."""
    truth: list[float] = []
    predicted: list[float] = []
    for query_truth, prediction in zip(truths, simulation.predictions, strict=True):
        if prediction is not None:
            truth += query_truth
            predicted += prediction
    return Score(
        feature_id=feature_id,
        method=method,
        value=pearson(truth, predicted),
        simulator=simulator,
        n_queries=len(truths),
        n_parse_failures=simulation.n_parse_failures,
        input_tokens=simulation.usage.input_tokens,
        output_tokens=simulation.usage.output_tokens,
        n_units=len(truth),
    )
