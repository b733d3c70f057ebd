import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from offline_pipeline.candidate_filter import FilterConfig, FilterPass
from offline_pipeline.detector_selection import detector_selection
from offline_pipeline.evaluation import auroc
from offline_pipeline.stages.filter import layer_queries, selected_passes


def _pass(feature: int, domain: str) -> FilterPass:
    return FilterPass(feature, domain, None, 0.99, 0.5, 1.0)


def _rows() -> list[str]:
    return ["drugs"] * 20 + ["hate"] * 20 + ["benign"] * 40 + ["other"] * 5


def test_auroc_counts_ties_half_as_sklearn_does():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 4, 60).astype(float)
    positive = np.arange(60) < 25
    assert auroc(score[positive], score[~positive]) == pytest.approx(roc_auc_score(positive, score))


def _layer(rows: np.ndarray) -> np.ndarray:
    layer = np.zeros((len(rows), 4))
    layer[rows == "drugs", 0] = 2.0  # separates drugs from benign alone
    layer[:, 1] = layer[:, 0]  # a copy: adds nothing once feature 0 is in
    layer[rows == "drugs", 2] = 2.0
    layer[rows == "benign", 2] = 3.0  # fires on every benign prompt: a false alarm each time
    layer[rows == "hate", 3] = 1.5
    layer[rows == "other", 3] = 9.0  # rows outside the task count for nothing
    return layer


PASSES = {3: [_pass(0, "drugs"), _pass(1, "drugs"), _pass(2, "drugs"), _pass(3, "hate"), _pass(3, "refusal"),
              FilterPass(2, "refusal", None, 0.9, 0.5, 1.0)]}


def test_selection_keeps_the_features_that_make_the_best_detector():
    rows = np.array(_rows())
    kept = detector_selection(PASSES, {3: _layer(rows)}, list(rows), n=10, min_gain=0.001)
    assert sorted((p.feature, p.domain) for p in kept[3]) == [(0, "drugs"), (2, "refusal"), (3, "hate"), (3, "refusal")]


def test_the_filter_stage_selects_then_caps_every_domain():
    rows = np.array(_rows())
    records = [{"domain": d, "pair_id": None, "language": "en", "is_lookalike": False} for d in rows]
    layer = _layer(rows)
    queries = {3: layer_queries(records, layer, np.zeros_like(layer), 1.0)}
    kept = selected_passes(queries, PASSES, FilterConfig(min_detector_gain=0.001, max_per_domain=1))
    assert sorted((p.feature, p.domain) for p in kept[3]) == [(0, "drugs"), (3, "hate"), (3, "refusal")]


def test_selection_stops_at_n_features_a_domain():
    rows = np.array(_rows())
    rng = np.random.default_rng(1)
    layer = rng.random((len(rows), 6))
    for feature in range(6):
        layer[(rows == "drugs") & (np.arange(len(rows)) % 6 == feature), feature] = 5.0  # each covers a sixth of drugs
    passes = {0: [_pass(f, "drugs") for f in range(6)]}
    assert len(detector_selection(passes, {0: layer}, list(rows), n=6, min_gain=0.001)[0]) == 6
    assert len(detector_selection(passes, {0: layer}, list(rows), n=2, min_gain=0.001)[0]) == 2


def test_min_detector_gain_is_checked():
    with pytest.raises(ValueError, match="min_detector_gain"):
        FilterConfig(min_detector_gain=-0.1)
