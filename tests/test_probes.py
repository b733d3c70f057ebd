"""Known answers for the probing baselines."""

import numpy as np
import pytest

from offline_pipeline.probes import (
    best_stump,
    group_split,
    k_sparse_probe,
    mean_difference_ranking,
    one_d_probe,
)


def _pairs(n_pairs: int = 40, n_features: int = 30, seed: int = 0):
    """Feature 7 separates perfectly (positives ~1, twins 0); feature 3 weakly; the rest is noise."""
    rng = np.random.default_rng(seed)
    x = rng.random((2 * n_pairs, n_features)) * 0.5
    y = np.tile([1, 0], n_pairs)
    groups = np.repeat(np.arange(n_pairs), 2)
    x[y == 1, 7] = 1.0 + rng.random(n_pairs)
    x[y == 0, 7] = 0.0
    x[y == 1, 3] += 0.2
    return x, y, groups


def test_group_split_keeps_pairs_together():
    groups = np.repeat(np.arange(10), 2)
    train, test = group_split(groups, 0.3, seed=1)
    assert test.sum() == 6 and train.sum() == 14
    assert set(groups[train]).isdisjoint(groups[test])


def test_mean_difference_ranking():
    x, y, _ = _pairs()
    ranking = mean_difference_ranking(x, y)
    assert ranking[0] == 7 and ranking[1] == 3


def test_best_stump_finds_the_separating_feature_and_threshold():
    x = np.array([[0.0, 5.0], [1.0, 4.0], [2.0, 3.0], [3.0, 2.0]])
    y = np.array([0, 0, 1, 1])
    stump = best_stump(x, y)
    # Both features separate; the lower index wins the tie; the cut sits between 1 and 2.
    assert (stump.feature, stump.direction, stump.threshold, stump.train_accuracy) == (0, 1, 1.5, 1.0)
    # Reversed direction: feature 1 is high for class 0.
    stump = best_stump(x[:, [1]], y)
    assert (stump.direction, stump.threshold, stump.train_accuracy) == (-1, 3.5, 1.0)
    assert stump.predict(x[:, [1]]).tolist() == [0, 0, 1, 1]


def test_probes_on_a_separable_feature():
    x, y, groups = _pairs()
    one_d = one_d_probe(x, y, groups)
    assert one_d.features == [7] and one_d.accuracy == 1.0
    sparse = k_sparse_probe(x, y, groups, k=2)
    assert sparse.features == [7, 3] and sparse.accuracy == 1.0
    assert sparse.n_train + sparse.n_test == len(y)


def test_probes_on_noise_are_near_chance():
    rng = np.random.default_rng(3)
    x = rng.random((400, 20))
    y = np.tile([1, 0], 200)
    groups = np.repeat(np.arange(200), 2)
    assert 0.3 < one_d_probe(x, y, groups).accuracy < 0.7
    assert 0.3 < k_sparse_probe(x, y, groups, k=5).accuracy < 0.7


def test_one_class_is_rejected():
    with pytest.raises(ValueError, match="both classes"):
        one_d_probe(np.zeros((4, 2)), np.ones(4, dtype=int), np.arange(4))
