"""`starmap report`: one self-contained HTML file describing a pipeline run.

Plotly's JavaScript is inlined (from `static/vendor/plotly.min.js`, or the plotly package's copy),
so the file opens offline. Sections:

1. the configuration sweep: L0,t against t and I_CDF per configuration and domain, probe accuracies,
   FVU against L0, and the selection rule with the ranking it produced;
2. SAE metrics per layer (FVU, L0, dead fraction, CE increase, loss recovered) and feature densities;
3. safety features per layer and domain (the paper's table);
4. held-out detection AUROC per domain, and the language gap on translated contrastive pairs (the
   paper's Hindi finding) -- both from the run folder's `evaluation.json`;
5. SLS against TLS: their correlation and their recorded cost (input and output tokens apart);
6. the monitors: the dense probes' and the k-sparse SAE probes' validation AUROC per domain and, given the
   per-prompt scores of `make bench-monitor` (`--monitor FILE`), the dense probe, the SAE-feature monitor and the
   k-sparse SAE probe side by side on the held-out prompts, with their ROC curves.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from offline_pipeline.corpus.records import SAFETY_DOMAINS
from starmap.db import models as db
from starmap.db.engine import make_engine

VENDORED_PLOTLY = Path(__file__).resolve().parents[1] / "static" / "vendor" / "plotly.min.js"


class ReportError(RuntimeError):
    """No run to report on, or the database is not a StarMap database."""


def plotly_js() -> str:
    if VENDORED_PLOTLY.is_file():
        return VENDORED_PLOTLY.read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _figure(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 50, "r": 20, "t": 40, "b": 40}, height=360)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "&ndash;"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return html.escape(str(value))


def _latest_run(session: Session, run_key: str | None) -> db.PipelineRun:
    query = select(db.PipelineRun)
    query = query.where(db.PipelineRun.run_key == run_key) if run_key else query.order_by(db.PipelineRun.finished_at.desc())
    run = session.scalars(query).first()
    if run is None:
        raise ReportError(f"no pipeline run {run_key!r} in the database" if run_key else "no pipeline run in the database (run `starmap pipeline run` first)")
    return run


def sweep_section(session: Session, run: db.PipelineRun) -> str:
    rows = session.scalars(select(db.SweepResult).where(db.SweepResult.run_id == run.id)).all()
    if not rows:
        return "<p>This run had no configuration sweep (its configuration was pinned by the preset).</p>"
    configs = sorted({(r.hook_kind, r.k) for r in rows}, key=lambda c: (c[0], c[1]))
    layers = sorted({r.layer for r in rows})
    parts = [f"<p>Sweep layer(s): {', '.join(map(str, layers))}. Normalised thresholds t; rows pooled over all pairs are labelled <em>all</em>.</p>"]
    by = defaultdict(list)
    for r in rows:
        by[(r.metric, r.domain)].append(r)
    domains = [d for d in SAFETY_DOMAINS if (("L0_t", d)) in by] + [None]
    # L0,t against t: one panel per domain, a line per configuration.
    for domain in domains:
        fig = go.Figure()
        for kind, k in configs:
            points = sorted((r.threshold, r.value) for r in by[("L0_t", domain)] if (r.hook_kind, r.k) == (kind, k) and r.value is not None)
            if points:
                fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=f"{kind} k={k}"))
        fig.update_layout(title=f"L0,t against t — {domain or 'all'}", xaxis_title="t (normalised activation)", yaxis_title="L0,t (features)")
        parts.append(_figure(fig, f"l0t-{domain or 'all'}"))
    reference = (run.config.get("preset", {}).get("sweep") or {}).get("reference_threshold")
    metric_rows = []
    for kind, k in configs:
        row = [kind, k]
        for domain in domains:
            value = next((r.value for r in by[("I_CDF", domain)] if (r.hook_kind, r.k) == (kind, k) and reference is not None and abs(r.threshold - reference) < 1e-9), None)
            row.append(value)
        metric_rows.append(row)
    parts.append(f"<h3>I_CDF at t = {reference}</h3>")
    parts.append(_table(["hook", "k", *[d or "all" for d in domains]], metric_rows))
    fig = go.Figure()
    for kind in sorted({c[0] for c in configs}):
        ks = sorted(k for c_kind, k in configs if c_kind == kind)
        values = [next((r.value for r in by[("I_CDF", None)] if (r.hook_kind, r.k) == (kind, k) and reference is not None and abs(r.threshold - reference) < 1e-9), None) for k in ks]
        fig.add_trace(go.Scatter(x=ks, y=values, mode="lines+markers", name=kind))
    fig.update_layout(title=f"I_CDF (all pairs, t = {reference}) against k", xaxis_title="k", yaxis_title="I_CDF")
    parts.append(_figure(fig, "icdf-k"))
    for metric, title in (("probe_ksparse", "k-sparse probe accuracy"), ("probe_1d", "1-d probe accuracy")):
        table_rows = [[kind, k, *[next((r.value for r in by[(metric, d)] if (r.hook_kind, r.k) == (kind, k)), None) for d in domains]] for kind, k in configs]
        parts.append(f"<h3>{title} (held-out pairs)</h3>" + _table(["hook", "k", *[d or "all" for d in domains]], table_rows))
    fig = go.Figure()
    for kind in sorted({c[0] for c in configs}):
        points = []
        for c_kind, k in configs:
            if c_kind != kind:
                continue
            fvu = next((r.value for r in by[("fvu", None)] if (r.hook_kind, r.k) == (kind, k)), None)
            l0 = next((r.value for r in by[("l0", None)] if (r.hook_kind, r.k) == (kind, k)), None)
            if fvu is not None and l0 is not None:
                points.append((l0, fvu, k))
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], text=[f"k={p[2]}" for p in points], mode="lines+markers+text", textposition="top center", name=kind))
    fig.update_layout(title="FVU against L0 (held-out tokens)", xaxis_title="L0", yaxis_title="FVU")
    parts.append(_figure(fig, "fvu-l0"))
    ranking = (run.chosen_config or {}).get("ranking") or []
    if ranking:
        parts.append("<h3>Selection</h3>")
        parts.append(
            _table(
                ["hook", "k", "safety-feature count", "mean I_CDF", "FVU", "eligible"],
                [[r["hook_kind"], r["k"], r["safety_feature_count"], r["mean_I_CDF"], r["fvu"], r["eligible"]] for r in ranking],
            )
        )
    return "\n".join(parts)


def sae_section(session: Session, sae_set: db.SaeSet) -> str:
    saes = session.scalars(select(db.Sae).where(db.Sae.sae_set_id == sae_set.id).order_by(db.Sae.layer)).all()
    keys = ["fvu", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_increase", "loss_recovered"]
    rows = [[s.layer, s.hook_name, *[(s.metrics or {}).get(k) for k in keys]] for s in saes]
    fig = go.Figure()
    for s in saes:
        hist = (s.metrics or {}).get("density_histogram") or {}
        edges, counts = hist.get("log10_edges"), hist.get("counts")
        if edges and counts:
            centres = [(a + b) / 2 for a, b in pairwise(edges)]
            fig.add_trace(go.Scatter(x=centres, y=counts, mode="lines", name=f"layer {s.layer}"))
    fig.update_layout(title="Feature density (log10 firing rate)", xaxis_title="log10 density", yaxis_title="features")
    return _table(["layer", "hook", *keys], rows) + _figure(fig, "density")


def safety_table(session: Session, sae_set: db.SaeSet) -> tuple[str, dict]:
    counts = session.execute(
        select(db.Feature.layer, db.Domain.name, func.count())
        .join(db.FeatureDomain, db.FeatureDomain.feature_id == db.Feature.id)
        .join(db.Domain, db.Domain.id == db.FeatureDomain.domain_id)
        .where(db.Feature.sae_set_id == sae_set.id, db.Feature.is_safety.is_(True))
        .group_by(db.Feature.layer, db.Domain.name)
    ).all()
    layers = [s.layer for s in session.scalars(select(db.Sae).where(db.Sae.sae_set_id == sae_set.id).order_by(db.Sae.layer))]
    grid = {(layer, domain): n for layer, domain, n in counts}
    rows = []
    for layer in layers:
        row = [layer, *[grid.get((layer, d), 0) for d in SAFETY_DOMAINS]]
        rows.append([*row, sum(row[1:])])
    rows.append(["all", *[sum(grid.get((layer, d), 0) for layer in layers) for d in SAFETY_DOMAINS], sum(grid.values())])
    return _table(["layer", *SAFETY_DOMAINS, "total (feature-domain tags)"], rows), grid


def evaluation_section(run: db.PipelineRun) -> str:
    run_dir = Path(run.config.get("run_dir", ""))
    found = sorted(run_dir.glob("evaluate-*/evaluation.json")) if run_dir.is_dir() else []
    if not found:
        return f"<p>The run folder {html.escape(str(run_dir))} with <code>evaluation.json</code> is not available here.</p>"
    evaluation = json.loads(found[-1].read_text())
    detection, candidates = evaluation["detection"], evaluation.get("detection_candidates", {})
    n_tagged, n_candidates = evaluation["tagged_per_domain"], evaluation.get("candidates_per_domain", {})

    def auroc_row(domain: str, row: dict, features: int | None) -> list:
        return [domain, features, row["auroc_vs_benign"], row["auroc_vs_lookalike"], row["n_harmful"], row["n_benign"],
                row["n_lookalike"]]

    headers = ["domain", "features", "AUROC vs benign", "AUROC vs look-alikes", "harmful", "benign", "look-alikes"]
    parts = [
        "<h3>Held-out detection (score split, English)</h3>",
        "<p>A query's domain score is the maximum normalised activation of the domain's features over its tokens. "
        "First with the safety-tagged features (filter passed and explanation scored), then with every feature that "
        "passed the precision-recall filter.</p>",
        _table(headers, [auroc_row(d, r, n_tagged.get(d)) for d, r in detection.items()]),
    ]
    if candidates:
        parts.append(_table(headers, [auroc_row(d, r, n_candidates.get(d)) for d, r in candidates.items()]))
    parts += [
        "<h3>Language gap on translated contrastive pairs</h3>",
        "<p>Pairs the filter did not see (explain and score splits). Fire rate: share of queries whose domain score exceeds the filter's tau.</p>",
        _table(
            ["language", "pairs", "mean score (query)", "mean score (twin)", "fire rate (query)", "fire rate (twin)", "query > twin"],
            [
                [lang, r["n_pairs"], r["mean_query"], r["mean_twin"], r["query_fire_rate"], r["twin_fire_rate"], r["separated"]]
                for lang, r in evaluation["language_gap"].items()
            ],
        ),
    ]
    return "\n".join(parts)


def scoring_section(session: Session, sae_set: db.SaeSet) -> str:
    rows = session.execute(
        select(db.Explanation.id, db.Explanation.explainer, db.Score.method, db.Score.value, db.Score.simulator, db.Score.input_tokens, db.Score.output_tokens)
        .join(db.Score, db.Score.explanation_id == db.Explanation.id)
        .join(db.Feature, db.Feature.id == db.Explanation.feature_id)
        .where(db.Feature.sae_set_id == sae_set.id)
    ).all()
    if not rows:
        return "<p>No scores recorded.</p>"
    per: dict[int, dict[str, float | None]] = defaultdict(dict)
    usage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    simulators = sorted({r.simulator for r in rows})
    explainers = sorted({r.explainer for r in rows})
    for r in rows:
        per[r.id][r.method] = r.value
        usage[r.method][0] += r.input_tokens or 0
        usage[r.method][1] += r.output_tokens or 0
    both = [(v["sls"], v["tls"]) for v in per.values() if v.get("sls") is not None and v.get("tls") is not None]
    correlation = float(np.corrcoef(np.array(both).T)[0, 1]) if len(both) >= 3 else None
    parts = [
        (
            f"<p>Explainer(s): {html.escape(', '.join(explainers))}; simulator(s): {html.escape(', '.join(simulators))}. "
            "Offline results are labelled as such and never mixed with LLM scores.</p>"
        ),
        _table(
            ["method", "scored explanations", "mean score", "input tokens", "output tokens"],
            [
                [m, sum(1 for v in per.values() if v.get(m) is not None), _mean([v.get(m) for v in per.values()]), usage[m][0], usage[m][1]]
                for m in sorted(usage)
            ],
        ),
        f"<p>Pearson r between SLS and TLS over {len(both)} explanations: {_cell(correlation)}.</p>",
    ]
    if usage.get("tls") and sum(usage["tls"]) > 0:
        parts.append(
            f"<p>SLS / TLS cost: input {_ratio(usage['sls'][0], usage['tls'][0])}, output {_ratio(usage['sls'][1], usage['tls'][1])} (paper: ~0.45).</p>"
        )
    else:
        parts.append("<p>No token usage recorded (offline simulator): the SLS / TLS cost ratio needs an LLM simulator.</p>")
    if both:
        fig = go.Figure(go.Scatter(x=[b[1] for b in both], y=[b[0] for b in both], mode="markers"))
        fig.update_layout(title="SLS against TLS per explanation", xaxis_title="TLS", yaxis_title="SLS")
        parts.append(_figure(fig, "sls-tls"))
    return "\n".join(parts)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "&ndash;"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


MONITOR_METHODS = ("probe", "sae", "ksparse")


def _monitor_score(row: dict, method: str, domain: str) -> float:
    """One held-out prompt's score (a `make bench-monitor` row) by one method for one domain ("any": all)."""
    if method == "sae":
        return max(row["domains"].get(d, 0.0) for d in SAFETY_DOMAINS) if domain == "any" else row["domains"].get(domain, 0.0)
    monitor = row.get("monitor") or {}
    if method == "probe":
        return (monitor.get("probe", {}).get(domain) or {}).get("p", 0.0)
    return monitor.get("ksparse", {}).get(domain, 0.0)


def monitor_section(session: Session, sae_set: db.SaeSet, heldout: Path | None) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    monitors = session.scalars(select(db.Monitor).where(db.Monitor.sae_set_id == sae_set.id)).all()
    rows = [[m.domain, m.method, m.layer if m.layer is not None else "", m.representation or f"{len(m.features or [])} features",
             m.auroc_validation, m.n_train, m.n_validation] for m in sorted(monitors, key=lambda m: (m.domain, m.method))]
    parts = ["<p>Validation AUROC (the filter split) of every monitor of the set.</p>",
             _table(["domain", "method", "layer", "reads", "validation AUROC", "train", "validation"], rows)]
    if heldout is None:
        parts.append("<p>No held-out scores given: run <code>make bench-monitor</code>, then "
                     "<code>starmap report --monitor $STARMAP_DATA_DIR/bench/monitor.jsonl</code>.</p>")
        return "".join(parts)
    prompts = [json.loads(line) for line in Path(heldout).read_text(encoding="utf-8").splitlines() if line.strip()]
    benign = [r for r in prompts if r["domain"] == "benign" and not r["lookalike"]]
    table = []
    for domain in (*SAFETY_DOMAINS, "any"):
        harmful = [r for r in prompts if (r["domain"] != "benign" if domain == "any" else r["domain"] == domain)]
        looks = [r for r in prompts if r["lookalike"] and (domain == "any" or r["looks_like"] == domain)]
        fig = go.Figure()
        row: list = [domain, len(harmful)]
        for method in MONITOR_METHODS:
            labels = [1] * len(harmful) + [0] * len(benign)
            scores = [_monitor_score(r, method, domain) for r in harmful + benign]
            looks_scores = [_monitor_score(r, method, domain) for r in harmful + looks]
            fpr, tpr, _ = roc_curve(labels, scores)
            area = roc_auc_score(labels, scores)
            area_looks = roc_auc_score([1] * len(harmful) + [0] * len(looks), looks_scores) if looks else None
            fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{method} (AUROC {area:.3f})"))
            row += [area, area_looks]
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#aaa"}, showlegend=False))
        fig.update_layout(title=f"{domain}: harmful vs benign", xaxis_title="false-positive rate", yaxis_title="true-positive rate")
        table.append(row)
        parts.append(_figure(fig, f"roc-{domain}"))
    headers = ["domain", "harmful prompts"] + [f"{m} {vs}" for m in MONITOR_METHODS for vs in ("vs benign", "vs look-alike")]
    parts.insert(2, f"<p>Held-out prompts ({len(prompts)}, {html.escape(str(heldout))}), AUROC:</p>" + _table(headers, table))
    return "".join(parts)


def build_report(url: str, run_key: str | None = None, monitor: Path | None = None) -> str:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            run = _latest_run(session, run_key)
            set_name = run.config.get("sae_set")
            sae_set = session.scalars(select(db.SaeSet).where(db.SaeSet.name == set_name)).first()
            if sae_set is None:
                raise ReportError(f"run {run.run_key}: its SAE set {set_name!r} is not in the database")
            model = session.get(db.Model, sae_set.model_id)
            table, _ = safety_table(session, sae_set)
            sections = [
                ("Configuration sweep", sweep_section(session, run)),
                ("SAE metrics per layer", sae_section(session, sae_set)),
                ("Safety features per layer and domain", table),
                ("Held-out evaluation", evaluation_section(run)),
                ("Explanation scores: SLS and TLS", scoring_section(session, sae_set)),
                ("Monitors: dense probes, SAE features, k-sparse SAE probes", monitor_section(session, sae_set, monitor)),
            ]
            header = (
                f"<h1>StarMap pipeline report</h1><p>Run <code>{html.escape(run.run_key)}</code> (preset "
                f"<code>{html.escape(run.preset)}</code>, {html.escape(run.status)}), model {html.escape(model.name)}, "
                f"SAE set <code>{html.escape(sae_set.name)}</code>: {html.escape(sae_set.hook_kind)}, k = {sae_set.k}, "
                f"d_sae = {sae_set.d_sae}.</p><p><strong>Selection rule.</strong> {html.escape(run.selection_rule or '')}</p>"
                f"<p>Map: {html.escape(str(run.config.get('map', '')))}.</p>"
            )
    finally:
        engine.dispose()
    body = header + "".join(f"<h2>{html.escape(title)}</h2>\n{content}" for title, content in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>StarMap report</title>"
        f"<style>{STYLE}</style><script>{plotly_js()}</script></head><body>{body}</body></html>"
    )


def write_report(url: str, out: Path, run_key: str | None = None, monitor: Path | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(url, run_key, monitor), encoding="utf-8")
    return out
