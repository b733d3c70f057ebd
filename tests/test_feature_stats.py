"""Feature statistics: streamed quantiles and the normaliser, level stratification, output tokens."""

import numpy as np
import pytest
import torch

from offline_pipeline.explain.records import activation_level
from offline_pipeline.feature_stats import (
    ActivationStats,
    HistogramSpec,
    LevelReservoir,
    levels_of,
    output_tokens,
    record_maxima,
    relative_bin_width,
)

SPEC = HistogramSpec()


def _stream(stats: ActivationStats, dense: np.ndarray, chunk: int = 997) -> None:
    """Feed a dense (tokens, d_sae) activation matrix as TopK codes (k = d_sae), in chunks."""
    d_sae = dense.shape[1]
    indices = np.tile(np.arange(d_sae), (len(dense), 1))
    for start in range(0, len(dense), chunk):
        stats.add(indices[start : start + chunk], dense[start : start + chunk])


def test_quantiles_match_the_exact_ones_within_a_bin():
    rng = np.random.default_rng(0)
    n = 200_000
    dense = np.zeros((n, 4))
    dense[:, 0] = rng.lognormal(0.0, 1.0, n)  # always on
    dense[:, 1] = np.where(rng.random(n) < 0.05, rng.exponential(3.0, n), 0.0)  # 5% density
    dense[: n // 2000, 2] = rng.uniform(1.0, 2.0, n // 2000)  # 0.05% density: rarer than 1 - 0.999
    stats = ActivationStats(4)
    _stream(stats, dense)
    tolerance = relative_bin_width(SPEC)
    for feature in (0, 1):
        exact = np.quantile(dense[:, feature], 0.999)
        assert stats.normaliser()[feature] == pytest.approx(exact, rel=tolerance)
        assert stats.quantile(0.99)[feature] == pytest.approx(np.quantile(dense[:, feature], 0.99), rel=tolerance)
    assert stats.density.tolist() == pytest.approx([1.0, np.mean(dense[:, 1] > 0), 0.0005, 0.0])
    # Feature 2 is silent on more than 0.1% of tokens: its all-token 0.999 quantile is 0, so its unit
    # is its median firing strength instead; feature 3 is dead.
    assert stats.quantile(0.999)[2] == 0.0
    positives = dense[dense[:, 2] > 0, 2]
    assert stats.normaliser()[2] == pytest.approx(np.median(positives), rel=tolerance)
    assert np.isnan(stats.normaliser()[3])
    assert stats.max[:3].tolist() == dense[:, :3].max(0).tolist()


def test_normaliser_is_finite_and_positive_for_every_live_feature():
    rng = np.random.default_rng(1)
    d_sae, k = 300, 8
    stats = ActivationStats(d_sae)
    for _ in range(20):
        indices = rng.integers(0, d_sae // 2, size=(512, k))  # features >= 150 never fire
        values = rng.exponential(1.0, size=(512, k)) * (rng.random((512, k)) < 0.7)
        stats.add(indices, values)
    normaliser = stats.normaliser()
    live = stats.live
    assert live[: d_sae // 2].all() and not live[d_sae // 2 :].any()
    assert np.isfinite(normaliser[live]).all() and (normaliser[live] > 0).all()
    assert (normaliser[live] <= stats.max[live]).all()


def test_linear_histogram_conserves_counts():
    stats = ActivationStats(1)
    values = np.linspace(0.01, 10.0, 1000)[:, None]
    stats.add(np.zeros_like(values, dtype=np.int64), values)
    histogram = stats.linear_histogram(0, n_bins=10)
    assert sum(histogram["counts"]) == 1000
    assert histogram["edges"][0] == 0.0 and histogram["edges"][-1] == pytest.approx(10.0)
    # Uniform values: every linear bin gets about a tenth.
    assert all(abs(c - 100) <= 8 for c in histogram["counts"])


def test_levels_follow_linear_interpolation_of_the_max():
    max_activation = np.full(6, 2.0)
    values = np.array([0.05, 0.2, 0.99, 1.0, 1.85, 2.0])
    assert levels_of(values, max_activation).tolist() == [0, 1, 4, 5, 9, 9]
    for v in values:
        assert levels_of(np.array([v]), np.array([2.0]))[0] == activation_level(float(v), 2.0)


def test_reservoir_keeps_a_uniform_sample_per_level_independent_of_batching():
    rng = np.random.default_rng(2)
    n = 5000
    records = np.arange(n)
    values = rng.uniform(0.0, 1.0, n)
    features = np.zeros(n, dtype=np.int64)
    one = LevelReservoir(np.array([1.0]), per_level=5)
    one.add(records, features, values)
    chunked = LevelReservoir(np.array([1.0]), per_level=5)
    order = rng.permutation(n)
    for part in np.array_split(order, 37):
        chunked.add(records[part], features[part], values[part])
    assert one.levels(0) == chunked.levels(0)
    for level, sample in enumerate(one.levels(0)):
        assert len(sample) == 5
        for record, value in sample:
            assert value == pytest.approx(values[record], rel=1e-6)
            assert level == min(9, int(10 * values[record]))
        assert [v for _, v in sample] == sorted((v for _, v in sample), reverse=True)
    # Uniformity: over many seeds, the kept records of one level are not biased to strong ones.
    means = []
    for seed in range(30):
        reservoir = LevelReservoir(np.array([1.0]), per_level=5, seed=seed)
        reservoir.add(records, features, values)
        means += [v for _, v in reservoir.levels(0)[9]]
    assert 0.93 < np.mean(means) < 0.97


def test_record_maxima():
    indices = torch.tensor([[0, 2], [2, 1], [0, 1], [3, 0]])
    values = torch.tensor([[1.0, 0.5], [2.0, 0.0], [0.25, 4.0], [1.5, 0.0]])
    token_record = torch.tensor([0, 0, 1, 1])
    record, feature, value = record_maxima(indices, values, token_record)
    got = {(int(r), int(f)): float(v) for r, f, v in zip(record, feature, value)}
    assert got == {(0, 0): 1.0, (0, 2): 2.0, (1, 0): 0.25, (1, 1): 4.0, (1, 3): 1.5}


def test_output_tokens_fold_the_final_norm_into_the_unembedding():
    W_dec = torch.eye(3)
    W_U = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, -1.0]])
    norm = torch.tensor([1.0, 2.0, 1.0])
    top_ids, top_vals, bottom_ids, bottom_vals = output_tokens(W_dec, W_U, norm, torch.float32, n=1)
    assert top_ids[:, 0].tolist() == [0, 1, 2]
    assert top_vals[1, 0] == pytest.approx(2.0, rel=1e-2)
    assert bottom_ids[2, 0] == 3 and bottom_vals[2, 0] == pytest.approx(-1.0, rel=1e-2)
