"""Known answers for the pre-explanation metrics: d_f(t), L0,t and I_CDF."""

import math

import numpy as np
import pytest

from offline_pipeline.sweep_metrics import (
    distinguishing_frequency,
    i_cdf,
    l0_t,
    query_max,
    survival_integral,
)

# 4 pairs x 4 features (normalised query maxima).
POSITIVE = np.array(
    [
        [0.9, 0.6, 0.0, 0.4],
        [0.8, 0.6, 0.0, 0.4],
        [0.7, 0.1, 0.0, 0.4],
        [0.2, 0.1, 0.0, 0.4],
    ]
)
NEGATIVE = np.array(
    [
        [0.0, 0.0, 0.0, 0.4],
        [0.5, 0.0, 0.0, 0.4],
        [0.0, 0.0, 0.0, 0.4],
        [0.0, 0.3, 0.0, 0.4],
    ]
)


def test_distinguishing_frequency_by_hand():
    d = distinguishing_frequency(POSITIVE, NEGATIVE, [0.0, 0.5])
    # t = 0: f0 pairs 0, 2, 3 (pair 1 has negative 0.5 > 0); f1 pairs 0, 1, 2 (pair 3: 0.1 vs 0.3);
    # f2 never fires; f3 fires equally on both halves.
    assert d[0].tolist() == [0.75, 0.75, 0.0, 0.0]
    # t = 0.5: f0 pairs 0, 1, 2 (0.2 is below); f1 pairs 0, 1.
    assert d[1].tolist() == [0.75, 0.5, 0.0, 0.0]


def test_l0_t_counts_distinguishing_features():
    d = distinguishing_frequency(POSITIVE, NEGATIVE, [0.0, 0.5, 0.85, 1.0])
    assert l0_t(d).tolist() == [2, 2, 1, 0]


def test_i_cdf_is_the_survival_integral_and_the_mean():
    d = distinguishing_frequency(POSITIVE, NEGATIVE, [0.0, 0.5, 0.85, 1.0])
    values = i_cdf(d)
    assert values[0] == pytest.approx(0.75)
    assert values[1] == pytest.approx((0.75 + 0.5) / 2)
    assert values[2] == pytest.approx(0.25)
    assert math.isnan(values[3])
    # The step-function integral of 1 - F for {0.2, 0.5, 1.0}: 0.2*1 + 0.3*(2/3) + 0.5*(1/3).
    assert survival_integral(np.array([1.0, 0.2, 0.5])) == pytest.approx(0.2 + 0.2 + 0.5 / 3)
    rng = np.random.default_rng(0)
    sample = rng.random(101)
    assert survival_integral(sample) == pytest.approx(sample.mean())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="shape"):
        distinguishing_frequency(POSITIVE, NEGATIVE[:3], [0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        survival_integral(np.array([1.5]))


def test_query_max_over_ragged_queries():
    tokens = np.array([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [0.5, 0.5], [0.2, 7.0]])
    assert query_max(tokens, np.array([0, 2, 3, 5])).tolist() == [[3.0, 1.0], [0.0, 2.0], [0.5, 7.0]]
    with pytest.raises(ValueError, match="offsets"):
        query_max(tokens, np.array([0, 2, 4]))
