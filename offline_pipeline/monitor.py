"""Monitors that detect harmful requests: dense probes on the hooked activations, and the k-sparse SAE probe.

Independent benchmarks find logistic probes on raw activations far ahead of probes on SAE features for
harmful-request detection (SAEGuardBench), so StarMap detects with a dense probe and explains with SAE
features (the app splits a probe's logit over the SAE features, `app/monitor.py`).

- Dense probe, per safety domain and for all domains together ("any"): an L2-regularised logistic
  regression on one hooked layer's activations of a prompt, either the mean over the user turn's content
  tokens ("mean") or the activation at the last prompt token, where the answer is decided ("last"). Every
  (layer, representation) is fitted on the training queries and the one with the best AUROC on the validation
  queries is kept; its probability is calibrated on the validation queries (Platt scaling).
- k-sparse SAE probe (Gurnee et al.): the `k` SAE features whose normalised maxima over the prompt differ most
  between the classes, then a logistic regression on them; calibrated the same way.

Weights are stored in the units the app reads: raw activations (the standardisation folded in) and normalised
SAE activations, so that `logit = weights . x + bias` and `p = sigmoid(a * logit + b)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.evaluation import auroc
from offline_pipeline.probes import mean_difference_ranking

ANY = "any"
REPRESENTATIONS = ("mean", "last")


@dataclass(frozen=True)
class MonitorConfig:
    c: float = 0.05  # inverse L2 strength of the dense probe (standardised inputs)
    k: int = 8  # features of the k-sparse SAE probe
    min_positives: int = 8  # a domain with fewer training positives gets no monitor


@dataclass
class Monitor:
    domain: str  # a safety domain, or "any"
    method: str  # "probe" (dense) or "ksparse" (SAE features)
    layer: int | None  # the dense probe's layer
    representation: str | None  # "mean" or "last" for the dense probe
    features: list[list[int]] | None  # the k-sparse probe's [layer, index] features
    weights: list[float]
    bias: float
    calibration: list[float]  # [a, b]: p = sigmoid(a * logit + b)
    auroc_validation: float | None
    n_train: int
    n_validation: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Fit:
    weights: np.ndarray
    bias: float
    auroc: float | None
    calibration: list[float]


def logistic(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, c: float
) -> Fit:
    """A standardised logistic regression, returned in the inputs' own units, scored and calibrated on validation."""
    mean, scale = x_train.mean(0), x_train.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    model = LogisticRegression(C=c, max_iter=2000).fit((x_train - mean) / scale, y_train)
    weights = model.coef_[0] / scale
    bias = float(model.intercept_[0] - (model.coef_[0] * mean / scale).sum())
    logits = x_val @ weights + bias
    return Fit(weights, bias, auroc(logits[y_val == 1], logits[y_val == 0]), platt(logits, y_val))


def platt(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """[a, b] with sigmoid(a * logit + b) calibrated on these labels (identity without both classes)."""
    if len(np.unique(labels)) < 2:
        return [1.0, 0.0]
    model = LogisticRegression(C=1e4, max_iter=2000).fit(logits[:, None], labels)
    return [float(model.coef_[0, 0]), float(model.intercept_[0])]


def task_rows(labels: np.ndarray, train: np.ndarray, validation: np.ndarray,
              config: MonitorConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit rows, validation rows) of a task's labelled queries; None with too few positives or one class only."""
    fit_rows, val_rows = train & (labels >= 0), validation & (labels >= 0)
    if labels[fit_rows].sum() < config.min_positives or len(np.unique(labels[val_rows])) < 2:
        return None
    return fit_rows, val_rows


def dense_probe(
    domain: str,
    representations: dict[tuple[int, str], np.ndarray],
    labels: np.ndarray,
    train: np.ndarray,
    validation: np.ndarray,
    config: MonitorConfig,
) -> Monitor | None:
    """The best (layer, representation) probe for `labels` (1, 0, or -1 for queries outside this task)."""
    rows = task_rows(labels, train, validation, config)
    if rows is None:
        return None
    fit_rows, val_rows = rows
    best: tuple[float, tuple[int, str], Fit] | None = None
    for key, x in sorted(representations.items()):
        fit = logistic(x[fit_rows], labels[fit_rows], x[val_rows], labels[val_rows], config.c)
        if fit.auroc is not None and (best is None or fit.auroc > best[0]):
            best = (fit.auroc, key, fit)
    if best is None:
        return None
    _, (layer, representation), fit = best
    return Monitor(domain, "probe", layer, representation, None, fit.weights.tolist(), fit.bias, fit.calibration,
                   fit.auroc, int(fit_rows.sum()), int(val_rows.sum()))


def ksparse_probe(
    domain: str,
    maxima: np.ndarray,
    columns: list[tuple[int, int]],
    labels: np.ndarray,
    train: np.ndarray,
    validation: np.ndarray,
    config: MonitorConfig,
) -> Monitor | None:
    """The k-sparse probe on SAE features (maxima: queries x features, normalised; columns: (layer, index))."""
    rows = task_rows(labels, train, validation, config)
    if rows is None:
        return None
    fit_rows, val_rows = rows
    chosen = mean_difference_ranking(maxima[fit_rows], labels[fit_rows])[: config.k]
    fit = logistic(maxima[fit_rows][:, chosen], labels[fit_rows], maxima[val_rows][:, chosen], labels[val_rows], 1.0)
    return Monitor(domain, "ksparse", None, None, [list(columns[i]) for i in chosen], fit.weights.tolist(), fit.bias,
                   fit.calibration, fit.auroc, int(fit_rows.sum()), int(val_rows.sum()))


def task_labels(domains: list[str], domain: str) -> np.ndarray:
    """1 for the domain's queries (any safety domain for "any"), 0 for benign ones, -1 for the rest."""
    positive = np.array([d in SAFETY_DOMAINS if domain == ANY else d == domain for d in domains])
    benign = np.array([d == "benign" for d in domains])
    return np.where(positive, 1, np.where(benign, 0, -1))
