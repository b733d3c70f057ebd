"""`starmap report`: a self-contained HTML file from a run in a real SQLite database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from offline_pipeline.report import ReportError, build_report
from starmap.db import models as db
from starmap.db.engine import make_engine
from starmap.db.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]


def _seed(url: str, run_dir: Path) -> None:
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        model = db.Model(name="toy-model", n_layers=4, d_model=8, source="test")
        s.add(model)
        s.flush()
        sae_set = db.SaeSet(model_id=model.id, name="quick-mlp_out-k4-x2", hook_kind="mlp_out", k=4, expansion=2, d_sae=16, origin="pipeline")
        s.add(sae_set)
        s.flush()
        domains = {name: db.Domain(name=name) for name in ("violence", "hate")}
        s.add_all(domains.values())
        s.flush()
        for layer, fvu in ((0, 0.11), (3, 0.27)):
            sae = db.Sae(
                sae_set_id=sae_set.id,
                layer=layer,
                hook_name=f"blocks.{layer}.hook_mlp_out",
                metrics={"fvu": fvu, "l0": 4.0, "dead_fraction": 0.0, "ce_increase": 0.05, "loss_recovered": 0.9,
                         "density_histogram": {"log10_edges": [-2.0, -1.0, 0.0], "counts": [5, 11]}},
            )
            s.add(sae)
            s.flush()
            for index in range(3):
                feature = db.Feature(
                    sae_id=sae.id, sae_set_id=sae_set.id, layer=layer, index=index, feature_id=f"{layer}_{index}",
                    normaliser=1.0, is_safety=index < 2,
                )
                s.add(feature)
                s.flush()
                if index < 2:
                    s.add(db.FeatureDomain(feature_id=feature.id, domain_id=domains["violence" if layer == 0 else "hate"].id, source="filter"))
                explanation = db.Explanation(feature_id=feature.id, text=f'Fires on "word{index}".', language="en",
                                             explainer="offline-statistical", explainer_model="starmap-lift-v1")
                s.add(explanation)
                s.flush()
                for method, value in (("sls", 0.2 + 0.2 * index), ("tls", 0.1 + 0.25 * index)):
                    s.add(db.Score(explanation_id=explanation.id, method=method, value=value, simulator="offline-lexical",
                                   n_queries=6, n_parse_failures=0, input_tokens=0, output_tokens=0))
        run = db.PipelineRun(
            run_key="quick-abc", preset="quick",
            config={"preset": {"sweep": {"reference_threshold": 0.3}}, "run_dir": str(run_dir), "sae_set": sae_set.name, "map": "UMAP (cosine metric) of SAE decoder directions, seed 0"},
            chosen_config={"hook_kind": "mlp_out", "k": 4, "ranking": [
                {"hook_kind": "mlp_out", "k": 4, "safety_feature_count": 17.0, "mean_I_CDF": 0.4, "fvu": 0.2, "eligible": True}]},
            selection_rule="Among the configurations ... L0,t ...", status="finished",
        )
        s.add(run)
        s.flush()
        for k in (2, 4):
            for t in (0.0, 0.3):
                for domain in ("violence", None):
                    s.add(db.SweepResult(run_id=run.id, hook_kind="mlp_out", k=k, layer=2, domain=domain, metric="L0_t", threshold=t, value=10.0 * k - 5 * t))
                    s.add(db.SweepResult(run_id=run.id, hook_kind="mlp_out", k=k, layer=2, domain=domain, metric="I_CDF", threshold=t, value=0.1 * k))
            s.add(db.SweepResult(run_id=run.id, hook_kind="mlp_out", k=k, layer=2, domain=None, metric="fvu", threshold=None, value=0.5 / k))
            s.add(db.SweepResult(run_id=run.id, hook_kind="mlp_out", k=k, layer=2, domain=None, metric="l0", threshold=None, value=float(k)))
    engine.dispose()


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<script>.*?</script>", " ", page, flags=re.DOTALL)))


def test_report_is_self_contained_and_shows_the_run(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'report.db'}"
    run_dir = tmp_path / "runs" / "quick-abc"
    _seed(url, run_dir)
    page = build_report(url)
    assert "Plotly" in page
    assert not re.findall(r"<script[^>]*\bsrc=", page) and not re.findall(r"<link[^>]*href=", page)
    text = _text(page)
    assert "quick-mlp_out-k4-x2" in text and "L0,t" in text
    # Layer x domain table: layer 0 has 2 violence features, layer 3 two hate ones.
    assert re.search(r"0 0 0 2 0 0 0 0 2", text), text
    assert re.search(r"3 0 0 0 0 0 0 2 2", text), text
    assert "is not available here" in text  # no run folder with evaluation.json
    # SLS vs TLS correlation over the 6 explanations (both linear in the index): r = 1.
    assert "Pearson r between SLS and TLS over 6 explanations: 1.000" in text
    assert "needs an LLM simulator" in text
    for div in ("l0t-violence", "l0t-all", "icdf-k", "fvu-l0", "density", "sls-tls"):
        assert f'id="{div}"' in page

    evaluate = run_dir / "evaluate-0123456789"
    evaluate.mkdir(parents=True)
    (evaluate / "evaluation.json").write_text(
        json.dumps(
            {
                "detection": {"violence": {"auroc_vs_benign": 0.875, "auroc_vs_lookalike": 0.625, "n_harmful": 8, "n_benign": 40, "n_lookalike": 4}},
                "detection_candidates": {"violence": {"auroc_vs_benign": 0.8125, "auroc_vs_lookalike": 0.5, "n_harmful": 8, "n_benign": 40, "n_lookalike": 4}},
                "tagged_per_domain": {"violence": 3},
                "candidates_per_domain": {"violence": 7},
                "language_gap": {"hi": {"n_pairs": 5, "mean_query": 0.12, "mean_twin": 0.1, "query_fire_rate": 0.2, "twin_fire_rate": 0.0, "separated": 0.6}},
            }
        )
    )
    text = _text(build_report(url))
    assert "violence 3 0.875 0.625 8 40 4" in text
    assert "violence 7 0.812 0.500 8 40 4" in text
    assert "hi 5 0.120 0.100 0.200 0.000 0.600" in text


def test_report_errors_are_clear(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    with pytest.raises(ReportError, match="no pipeline run"):
        build_report(url)
    env = {**os.environ, "STARMAP_DATABASE_URL": url, "STARMAP_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "starmap.cli", "report", "--out", str(tmp_path / "r.html")],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2 and "no pipeline run" in result.stderr


def test_report_command_writes_the_file(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    _seed(url, tmp_path / "missing")
    env = {**os.environ, "STARMAP_DATABASE_URL": url, "STARMAP_DATA_DIR": str(tmp_path)}
    out = tmp_path / "out" / "report.html"
    subprocess.run([sys.executable, "-m", "starmap.cli", "report", "--out", str(out)], cwd=REPO, env=env, check=True, capture_output=True)
    assert out.stat().st_size > 1_000_000  # Plotly is inlined
