"""Probing baselines for the config sweep: how well an SAE's features classify a concept.

Both probes read query-level features (a_f(q) = max activation over the query's tokens) of
labelled queries (concept queries = 1, their contrastive twins = 0) and report accuracy on held-out
queries. Contrastive twins are kept in the same fold, so a probe never sees one half of a pair in
training and the other in testing.

- k-sparse probe (Gurnee et al.'s sparse probing): the k features with the largest absolute
  difference of class means on the training fold, then an L2-regularised logistic regression on them.
- 1-d probe: the best single-feature threshold classifier on the training fold (either direction),
  applied as is to the held-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeResult:
    accuracy: float  # held-out accuracy
    features: list[int]  # the features the probe reads
    n_train: int
    n_test: int


def _check(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> None:
    if features.ndim != 2 or len(features) != len(labels) or len(labels) != len(groups):
        raise ValueError(
            f"probe inputs disagree: features {features.shape}, labels {labels.shape}, groups {groups.shape}"
        )
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("probe labels must contain both classes 0 and 1")


def group_split(groups: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks that keep every group (a contrastive pair) on one side."""
    unique = np.unique(groups)
    if len(unique) < 2:
        raise ValueError("a held-out split needs at least two groups (pairs)")
    rng = np.random.default_rng(seed)
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    test_groups = rng.choice(unique, size=n_test, replace=False)
    test = np.isin(groups, test_groups)
    return ~test, test


def mean_difference_ranking(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Features ordered by |mean over class 1 - mean over class 0|, largest first (ties: lower index)."""
    diff = np.abs(features[labels == 1].mean(0) - features[labels == 0].mean(0))
    return np.lexsort((np.arange(len(diff)), -diff))


def k_sparse_probe(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, test_fraction: float = 0.3, seed: int = 0
) -> ProbeResult:
    features, labels, groups = np.asarray(features, dtype=np.float64), np.asarray(labels), np.asarray(groups)
    _check(features, labels, groups)
    train, test = group_split(groups, test_fraction, seed)
    if len(np.unique(labels[train])) < 2:
        raise ValueError("the training fold holds one class only; add more pairs")
    chosen = mean_difference_ranking(features[train], labels[train])[:k]
    scaler = StandardScaler().fit(features[train][:, chosen])
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train][:, chosen]), labels[train])
    predicted = model.predict(scaler.transform(features[test][:, chosen]))
    return ProbeResult(float((predicted == labels[test]).mean()), chosen.tolist(), int(train.sum()), int(test.sum()))


@dataclass
class Stump:
    feature: int
    threshold: float
    direction: int  # +1: predict 1 when value > threshold; -1: predict 1 when value <= threshold
    train_accuracy: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        above = features[:, self.feature] > self.threshold
        return (above if self.direction > 0 else ~above).astype(int)


def best_stump(features: np.ndarray, labels: np.ndarray) -> Stump:
    """The single-feature threshold classifier with the highest accuracy (ties: lower feature index)."""
    n, n_features = features.shape
    order = np.argsort(features, axis=0, kind="stable")
    sorted_values = np.take_along_axis(features, order, axis=0)
    sorted_labels = labels[order]
    # Threshold after the j-th smallest value (j = 0..n): predict 1 above it.
    ones_below = np.vstack([np.zeros((1, n_features)), np.cumsum(sorted_labels, axis=0)])
    zeros_below = np.arange(n + 1)[:, None] - ones_below
    correct_up = zeros_below + (labels.sum() - ones_below)
    accuracy_up, accuracy_down = correct_up / n, (n - correct_up) / n
    # A threshold can only sit between distinct values.
    valid = np.ones((n + 1, n_features), dtype=bool)
    valid[1:n] = sorted_values[1:] > sorted_values[:-1]
    accuracy_up = np.where(valid, accuracy_up, -1)
    accuracy_down = np.where(valid, accuracy_down, -1)
    best_up, best_down = accuracy_up.max(0), accuracy_down.max(0)
    per_feature = np.maximum(best_up, best_down)
    feature = int(np.argmax(per_feature))
    direction = 1 if best_up[feature] >= best_down[feature] else -1
    j = int(np.argmax(accuracy_up[:, feature] if direction > 0 else accuracy_down[:, feature]))
    column = sorted_values[:, feature]
    if j == 0:
        threshold = float(column[0]) - 1.0
    elif j == n:
        threshold = float(column[-1])
    else:
        threshold = float((column[j - 1] + column[j]) / 2)
    return Stump(feature, threshold, direction, float(per_feature[feature]))


def one_d_probe(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, test_fraction: float = 0.3, seed: int = 0
) -> ProbeResult:
    features, labels, groups = np.asarray(features, dtype=np.float64), np.asarray(labels), np.asarray(groups)
    _check(features, labels, groups)
    train, test = group_split(groups, test_fraction, seed)
    stump = best_stump(features[train], labels[train])
    predicted = stump.predict(features[test])
    return ProbeResult(float((predicted == labels[test]).mean()), [stump.feature], int(train.sum()), int(test.sum()))
