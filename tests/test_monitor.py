"""Monitors: dense probes chosen and calibrated on validation queries, the k-sparse SAE probe, and the app's
split of a probe's logit over SAE features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.monitor import Monitors
from offline_pipeline.monitor import ANY, MonitorConfig, dense_probe, ksparse_probe, logistic, task_labels
from sae_engine.inference import SAEBundle
from sae_engine.topk import TopKSAE


def _data(n: int = 400, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signal = rng.normal(size=(n, d))
    informative = signal.copy()
    informative[:, 3] += 2.5 * labels  # the class shows along one direction, on one layer only
    train = np.arange(n) < n // 2
    return labels, {(0, "mean"): signal, (5, "mean"): informative, (5, "last"): signal}, train, ~train


def test_the_probe_keeps_the_informative_layer_and_is_calibrated():
    labels, features, train, validation = _data()
    monitor = dense_probe("drugs", features, labels, train, validation, MonitorConfig(c=1.0))
    assert (monitor.layer, monitor.representation) == (5, "mean")
    assert monitor.auroc_validation > 0.9 and monitor.n_train == 200
    # Weights in raw units: the logit is weights . x + bias, and the calibrated probability tracks the labels.
    x = features[(5, "mean")][validation]
    logits = x @ np.array(monitor.weights) + monitor.bias
    a, b = monitor.calibration
    p = 1 / (1 + np.exp(-(a * logits + b)))
    assert abs(p.mean() - labels[validation].mean()) < 0.05
    assert ((p > 0.5) == labels[validation]).mean() > 0.85


def test_standardisation_is_folded_into_raw_weights():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(loc=5.0, scale=[1, 10, 0.1], size=(300, 3))
    y = (x[:, 1] + 3 * x[:, 0] > 20).astype(int)
    fit = logistic(x[:200], y[:200], x[200:], y[200:], c=1.0)
    mean, scale = x[:200].mean(0), x[:200].std(0)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit((x[:200] - mean) / scale, y[:200])
    expected = reference.decision_function((x[200:] - mean) / scale)
    assert x[200:] @ fit.weights + fit.bias == pytest.approx(expected, abs=1e-6)
    assert fit.auroc > 0.95


def test_labels_and_domains_without_enough_data():
    assert task_labels(["drugs", "benign", "hate", "other"], "drugs").tolist() == [1, 0, -1, -1]
    assert task_labels(["drugs", "benign", "hate", "other"], ANY).tolist() == [1, 0, 1, -1]
    labels, features, train, validation = _data(n=20)
    assert dense_probe("drugs", features, labels, train, validation, MonitorConfig(min_positives=50)) is None


def test_ksparse_reads_the_features_that_differ():
    labels, features, train, validation = _data()
    maxima = np.abs(np.hstack([features[(0, "mean")], features[(5, "mean")]]))
    maxima[:, 19] = labels * 2.0 + np.random.default_rng(2).random(len(labels))
    columns = [(0, i) for i in range(16)] + [(5, i) for i in range(16)]
    monitor = ksparse_probe("drugs", maxima, columns, labels, train, validation, MonitorConfig(k=2))
    assert monitor.features[0] == [5, 3] and monitor.auroc_validation > 0.9


def _bundle(d_in: int = 8, d_sae: int = 32, k: int = 4) -> SAEBundle:
    torch.manual_seed(0)
    saes = {f"blocks.{layer}.hook_mlp_out": TopKSAE(d_in, d_sae, k) for layer in (0, 1)}
    for sae in saes.values():
        torch.nn.init.normal_(sae.W_enc)
        torch.nn.init.normal_(sae.b_dec, std=0.1)
    return SAEBundle.from_saes(saes, {h: torch.ones(d_sae) for h in saes})


def test_the_apps_reasons_add_up_to_the_probes_logit():
    bundle = _bundle()
    rng = np.random.default_rng(3)
    w = rng.normal(size=8).tolist()
    monitors = Monitors([
        {"domain": "drugs", "method": "probe", "layer": 1, "representation": "mean", "features": None,
         "weights": w, "bias": 0.5, "calibration": [1.0, 0.0]},
        {"domain": "drugs", "method": "ksparse", "layer": None, "representation": None, "features": [[0, 1], [1, 2]],
         "weights": [1.0, -1.0], "bias": 0.0, "calibration": [2.0, 0.0]},
    ], bundle)
    acts = torch.randn(2, 6, 8)
    content = torch.tensor([False, True, True, True, False, False])
    out = monitors.assess(acts, content)
    risk = out["probe"]["drugs"]
    x = acts[1, content].mean(0)
    assert risk["logit"] == pytest.approx(float(x @ torch.tensor(w)) + 0.5, abs=1e-3)
    assert risk["p"] == pytest.approx(float(torch.sigmoid(torch.tensor(risk["logit"]))), abs=1e-3)
    # The logit splits exactly: sum over features of z_f (w . W_dec[f]), plus w . b_dec, plus w . (SAE error), plus bias.
    top = bundle.encode(acts)
    codes = torch.zeros(6, bundle.d_sae).scatter_(1, top.indices[1], top.values[1].float())[content]
    weights = torch.tensor(w, dtype=torch.float32)
    terms = codes.mean(0) * (bundle.W_dec[1] @ weights)
    reconstruction = codes @ bundle.W_dec[1] + bundle.b_dec[1, 0]
    error = (acts[1, content] - reconstruction).mean(0)
    assert float(terms.sum() + bundle.b_dec[1, 0] @ weights + error @ weights) + 0.5 == pytest.approx(risk["logit"], abs=1e-3)
    # The reasons are the largest positive terms, largest first.
    expected = [(f"1_{int(i)}", round(float(v), 4)) for v, i in zip(*terms.topk(5)) if v > 0]
    assert [(r["id"], r["contribution"]) for r in risk["reasons"]] == expected
    assert 0.0 <= out["ksparse"]["drugs"] <= 1.0
