"""Stage `flip`: the smallest feature edits that flip the model's safety decision (`offline_pipeline.flip_search`).

On the `filter` split: `unlock` searches on harmful prompts the model refused, `induce` on benign prompts it
answered. Each found set is written with its search figures and its capability cost (`sae_engine.capability`),
and becomes a named steering preset in the database; `make bench-flip` measures it on held-out prompts the
search never saw. Writes `flip.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from offline_pipeline.activation_cache import ActivationCache, as_float
from offline_pipeline.flip_search import FlipConfig, as_intervention, candidates, search
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.model import load_preset_model
from offline_pipeline.stages.refusal import labelled_prompts
from offline_pipeline.stages.stats import load_stats
from offline_pipeline.stages.train import load_saes
from sae_engine.capability import steering_cost, unsteered_baseline
from sae_engine.inference import SAEBundle


def last_token_features(cache: ActivationCache, hook: str, sae, records: list[int], normaliser: np.ndarray) -> np.ndarray:
    """(records, d_sae) normalised SAE activations at each record's last prompt token."""
    last = cache.answer_start[np.asarray(records, dtype=np.int64)] - 1
    order = np.argsort(last)
    x = torch.empty(len(last), cache.acts(hook).shape[1])
    x[torch.from_numpy(order)] = as_float(cache.acts(hook)[last[order]])
    with torch.no_grad():
        top = sae.encode_topk(x.to(sae.W_enc.device))
    dense = torch.zeros(len(last), sae.d_sae).scatter_(1, top.indices.cpu(), top.values.float().cpu())
    safe = np.where(np.isfinite(normaliser) & (normaliser > 0), normaliser, np.inf)
    return dense.numpy() / safe


def search_prompts(records: list[dict], chosen: list[int], refused: np.ndarray, n: int) -> dict[str, list[str]]:
    """The prompts each search judges on: refused harmful ones (unlock), answered benign ones (induce)."""
    rng = np.random.default_rng(0)
    unlock = [records[i]["text"] for i, r in zip(chosen, refused) if r and records[i]["domain"] not in ("benign", "other")]
    induce = [records[i]["text"] for i, r in zip(chosen, refused) if not r and records[i]["domain"] == "benign"]
    return {goal: [texts[j] for j in sorted(rng.choice(len(texts), size=min(n, len(texts)), replace=False))]
            for goal, texts in (("unlock", unlock), ("induce", induce))}


def run_flip(ctx: StageContext) -> dict:
    preset = ctx.preset
    config: FlipConfig = preset.flip
    cache = ActivationCache.open(ctx.input("activations"))
    chosen, refused = labelled_prompts(cache.records)
    saes = load_saes(ctx)
    normalisers = {hook: load_stats(ctx.input("stats"), layer)["normaliser"] for layer, (hook, _) in saes.items()}
    last = {layer: last_token_features(cache, hook, sae, chosen, normalisers[hook]) for layer, (hook, sae) in saes.items()}
    pool = candidates(last, refused, config.per_layer)
    loaded = load_preset_model(preset, ctx.settings)
    bundle = SAEBundle.from_saes(dict(saes.values()),
                                 {hook: torch.from_numpy(n.astype(np.float32)) for hook, n in normalisers.items()},
                                 device=loaded.device)
    prompts = search_prompts(cache.records, chosen, refused, config.n_search)
    baseline = unsteered_baseline(loaded)
    results = {}
    for goal in ("unlock", "induce"):
        if not prompts[goal]:  # a model that never refuses has nothing to unlock
            results[goal] = {"goal": goal, "best": None, "trials": [], "candidates": []}
            continue
        result = search(loaded, bundle, goal, prompts[goal], pool, config, progress=print)
        entry = result.as_dict()
        if result.best is not None:
            edit = [as_intervention(i) for i in result.best.interventions]
            entry["cost"] = steering_cost(loaded, bundle, edit, baseline=baseline).as_dict()
            entry["example"] = prompts[goal][0]
        results[goal] = entry
    write_json_atomic(ctx.out / "flip.json", {"search_prompts": prompts, "results": results})
    return {
        goal: (None if r["best"] is None else
               {"features": len(r["best"]["interventions"]), "search_flips": f"{r['best']['flipped']}/{r['best']['n']}",
                "broken": r["best"]["broken"], "ce_increase": r.get("cost", {}).get("ce_increase")})
        for goal, r in results.items()
    }


def load_flips(folder: Path) -> dict:
    return json.loads((folder / "flip.json").read_text())
