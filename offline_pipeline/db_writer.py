"""Writing a finished pipeline run into the database: one transaction, idempotent.

The run's SAE set is named `<preset>-<hook kind>-k<k>-x<expansion>` under its model. Re-writing a
run first deletes that set (the database cascades to its SAEs, features, domains, concepts,
examples, explanations and scores) and the run's `pipeline_runs` row (cascading to its sweep
results), then inserts everything again, all inside one transaction: a reader sees the old run or
the new one, never a mix, and writing the same run twice leaves exactly the same rows.

Features: every live feature (fired at least once on the statistics corpus) gets a row with its
statistics; the precision-recall candidates also get examples, explanations, scores, concept
precision/recall and map coordinates; `is_safety` marks the candidates that pass the score gate,
and only those get `feature_domains` rows. A candidate without an explanation is `candidate_only`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from offline_pipeline.candidate_filter import REFUSAL
from offline_pipeline.corpus.concepts import CONCEPTS
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.feature_stats import QUANTILE_POINTS
from offline_pipeline.stages.filter import load_passes
from offline_pipeline.stages.flip import load_flips
from offline_pipeline.stages.jsonl import read_jsonl
from offline_pipeline.stages.monitor import load_monitors
from offline_pipeline.stages.refusal import load_directions
from offline_pipeline.stages.stats import load_stats
from offline_pipeline.stages.train import sae_folder
from starmap.db import models as db
from starmap.db.engine import make_engine
from starmap.db.migrate import upgrade

ACTIVATING_SOURCE = "activating"
HARD_NEGATIVE_SOURCE = "hard-negative"
RANDOM_NEGATIVE_SOURCE = "random-negative"


@dataclass
class RunFolders:
    corpus: Path
    activations: Path
    choose: Path
    train: Path
    stats: Path
    filter: Path
    explain: Path
    map: Path
    evaluate: Path
    monitor: Path
    refusal: Path
    flip: Path
    sweep: Path | None = None


def set_name(preset_name: str, hook_kind: str, k: int, expansion: int, seed: int) -> str:
    """The SAE set's name; runs with another seed (`--seed`) get sets of their own instead of replacing it."""
    return f"{preset_name}-{hook_kind}-k{k}-x{expansion}" + (f"-seed{seed}" if seed else "")


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _get_or_create(session: Session, model, **fields):
    row = session.scalar(select(model).filter_by(**fields))
    if row is None:
        row = model(**fields)
        session.add(row)
        session.flush()
    return row


def write_run(url: str, preset, run_dir: Path, folders: RunFolders, tags: dict[str, list[str]]) -> dict[str, int]:
    """Write the run; returns row counts of what was written."""
    upgrade(url)
    meta = json.loads((folders.activations / "meta.json").read_text())
    choice = json.loads((folders.choose / "choice.json").read_text())
    metrics = json.loads((folders.train / "metrics.json").read_text())
    coords = json.loads((folders.map / "map.json").read_text())
    passes = load_passes(folders.filter)
    explanations = {e["feature_id"]: e for e in read_jsonl(folders.explain / "explanations.jsonl")}
    scores: dict[str, list[dict]] = {}
    for s in read_jsonl(folders.explain / "scores.jsonl"):
        scores.setdefault(s["feature_id"], []).append(s)
    examples = {e["feature_id"]: e for e in read_jsonl(folders.explain / "examples.jsonl")}
    sweep_rows = json.loads((folders.sweep / "sweep.json").read_text()) if folders.sweep else []
    hook_kind, k = choice["hook_kind"], int(choice["k"])
    name = set_name(preset.name, hook_kind, k, preset.train.expansion_factor, preset.train.seed)
    counts = {"features": 0, "safety_features": 0, "explanations": 0, "scores": 0, "examples": 0}
    engine = make_engine(url)
    try:
        with Session(engine) as session, session.begin():
            model = session.scalar(select(db.Model).where(db.Model.name == meta["model_name"]))
            if model is None:
                model = db.Model(name=meta["model_name"], n_layers=meta["n_layers"], d_model=meta["d_model"], source="pipeline")
                session.add(model)
                session.flush()
            run_key = run_dir.name
            session.execute(delete(db.SaeSet).where(db.SaeSet.model_id == model.id, db.SaeSet.name == name))
            session.execute(delete(db.PipelineRun).where(db.PipelineRun.run_key == run_key))
            domains = {d: _get_or_create(session, db.Domain, name=d).id for d in (*SAFETY_DOMAINS, REFUSAL)}
            concepts = {c.id: _get_or_create(session, db.Concept, domain_id=domains[c.domain], name=c.id).id for c in CONCEPTS}
            sae_set = db.SaeSet(
                model_id=model.id,
                name=name,
                hook_kind=hook_kind,
                k=k,
                expansion=preset.train.expansion_factor,
                d_sae=meta["d_model"] * preset.train.expansion_factor,
                origin="pipeline",
            )
            session.add(sae_set)
            session.flush()
            for layer in tqdm(preset.layers, desc="write database", unit="layer"):
                hook = f"blocks.{layer}.hook_{hook_kind}"
                sae = db.Sae(
                    sae_set_id=sae_set.id,
                    layer=layer,
                    hook_name=hook,
                    checkpoint_path=str(sae_folder(folders.train, hook)),
                    metrics=_json_metrics(metrics[hook]),
                )
                session.add(sae)
                session.flush()
                stats = load_stats(folders.stats, layer)
                candidates = {p.feature for p in passes[layer]}
                feature_ids = _insert_features(session, sae, sae_set, layer, stats, candidates, tags, coords["coords"], explanations)
                counts["features"] += len(feature_ids)
                for feature, pk in feature_ids.items():
                    fid = f"{layer}_{feature}"
                    if fid in tags:
                        counts["safety_features"] += 1
                        session.execute(
                            insert(db.FeatureDomain),
                            [{"feature_id": pk, "domain_id": domains[d], "source": "filter"} for d in tags[fid]],
                        )
                concept_rows = [
                    {
                        "feature_id": feature_ids[p.feature],
                        "concept_id": concepts[p.concept],
                        "precision": p.precision,
                        "recall": p.recall,
                        "threshold": p.threshold,
                    }
                    for p in passes[layer]
                    if p.concept is not None and p.concept in concepts
                ]
                if concept_rows:
                    session.execute(insert(db.FeatureConcept), concept_rows)
                for feature in sorted(candidates):
                    fid = f"{layer}_{feature}"
                    counts["examples"] += _insert_examples(session, feature_ids[feature], examples.get(fid))
                    if fid in explanations:
                        counts["explanations"] += 1
                        counts["scores"] += _insert_explanation(session, feature_ids[feature], explanations[fid], scores.get(fid, []))
            run = db.PipelineRun(
                run_key=run_key,
                preset=preset.name,
                config={"preset": preset.as_dict(), "run_dir": str(run_dir), "sae_set": name, "map": coords["description"]},
                chosen_config={"hook_kind": hook_kind, "k": k, "ranking": choice.get("ranking", []), "pinned": choice.get("pinned", False)},
                selection_rule=choice["rule"],
                finished_at=datetime.now(timezone.utc),
                status="finished",
            )
            session.add(run)
            session.flush()
            if sweep_rows:
                session.execute(insert(db.SweepResult), [{"run_id": run.id, **row} for row in sweep_rows])
            monitors = load_monitors(folders.monitor)["monitors"]
            if monitors:
                session.execute(insert(db.Monitor), [{"sae_set_id": sae_set.id, **m} for m in monitors])
            counts["monitors"] = len(monitors)
            directions = load_directions(folders.refusal)
            for layer, d in sorted(directions.items(), key=lambda kv: int(kv[0])):
                session.add(db.RefusalDirection(sae_set_id=sae_set.id, layer=int(layer), **d))
            counts["refusal_directions"] = len(directions)
            counts["presets"] = _insert_flip_presets(session, sae_set, load_flips(folders.flip))
    finally:
        engine.dispose()
    return counts


FLIP_DESCRIPTIONS = {
    "unlock": "Turns the model's refusals of harmful requests into fluent answers (found by the flip search).",
    "induce": "Makes the model refuse benign requests it answers (found by the flip search).",
}


def _insert_flip_presets(session: Session, sae_set: db.SaeSet, flips: dict) -> int:
    """One steering preset per goal the flip search solved, with its search figures, cost and an example."""
    written = 0
    for goal, result in flips["results"].items():
        best = result["best"]
        if best is None or best["flipped"] == 0:
            continue
        interventions = [
            {"feature": f"{i['layer']}_{i['index']}", "mode": i["mode"], "value": i["value"], "scope": i.get("scope", "both")}
            for i in best["interventions"]
        ]
        figures = {"search_flip_rate": best["flipped"] / best["n"], "search_prompts": best["n"], "search_broken": best["broken"],
                   **result.get("cost", {})}
        session.add(db.SteeringPreset(name=f"{sae_set.name} {goal}", sae_set_id=sae_set.id, interventions=interventions,
                                      description=FLIP_DESCRIPTIONS[goal], figures=figures, example=result.get("example")))
        written += 1
    return written


def _json_metrics(metrics: dict) -> dict:
    return {key: (None if isinstance(value, float) and not np.isfinite(value) else value) for key, value in metrics.items()}


def _insert_features(session, sae, sae_set, layer, stats, candidates, tags, coords, explanations) -> dict[int, int]:
    """Insert the layer's live features; returns feature index -> primary key."""
    live = np.flatnonzero(stats["density"] > 0)
    rows = []
    for feature in live.tolist():
        fid = f"{layer}_{feature}"
        xy = coords.get(fid)
        top = float(stats["max"][feature])
        rows.append(
            {
                "sae_id": sae.id,
                "sae_set_id": sae_set.id,
                "layer": layer,
                "index": feature,
                "feature_id": fid,
                "density": float(stats["density"][feature]),
                "max_activation": top,
                "normaliser": _finite(stats["normaliser"][feature]),
                "quantiles": {str(q): float(v) for q, v in zip(QUANTILE_POINTS, stats["quantiles"][:, feature])},
                "histogram": {
                    "edges": np.linspace(0.0, top, stats["histogram_counts"].shape[1] + 1).tolist(),
                    "counts": stats["histogram_counts"][feature].tolist(),
                },
                "top_tokens": _tokens(stats["top_tokens"][feature], stats["top_vals"][feature]),
                "bottom_tokens": _tokens(stats["bottom_tokens"][feature], stats["bottom_vals"][feature]),
                "umap_x": xy[0] if xy else None,
                "umap_y": xy[1] if xy else None,
                "is_safety": fid in tags,
                "candidate_only": feature in candidates and fid not in explanations,
            }
        )
    if not rows:
        return {}
    result = session.execute(
        insert(db.Feature).returning(db.Feature.id, db.Feature.index, sort_by_parameter_order=True), rows
    )
    return {index: pk for pk, index in result}


def _tokens(strings: np.ndarray, values: np.ndarray) -> list[dict]:
    return [{"token": str(t), "value": round(float(v), 4)} for t, v in zip(strings, values)]


def _insert_examples(session, feature_pk: int, feature_examples: dict | None) -> int:
    if not feature_examples:
        return 0
    rows = []
    for level, records in enumerate(feature_examples["levels"]):
        for rank, record in enumerate(records):
            rows.append({"level": level, "rank": rank, "source": ACTIVATING_SOURCE, **record})
    for source, key in ((HARD_NEGATIVE_SOURCE, "hard_negatives"), (RANDOM_NEGATIVE_SOURCE, "random_negatives")):
        for rank, record in enumerate(feature_examples.get(key) or []):
            rows.append({"level": 0, "rank": rank, "source": source, **record})
    if rows:
        session.execute(insert(db.Example), [{"feature_id": feature_pk, **row} for row in rows])
    return len(rows)


def _insert_explanation(session, feature_pk: int, explanation: dict, scores: list[dict]) -> int:
    row = db.Explanation(
        feature_id=feature_pk,
        text=explanation["text"],
        language=explanation.get("language", "en"),
        explainer=explanation["explainer"],
        explainer_model=explanation["explainer_model"],
        input_tokens=explanation.get("input_tokens"),
        output_tokens=explanation.get("output_tokens"),
    )
    session.add(row)
    session.flush()
    for s in scores:
        session.add(
            db.Score(
                explanation_id=row.id,
                method=s["method"],
                value=s["value"],
                simulator=s["simulator"],
                n_queries=s["n_queries"],
                n_parse_failures=s["n_parse_failures"],
                input_tokens=s["input_tokens"],
                output_tokens=s["output_tokens"],
            )
        )
    return len(scores)
