"""Stage `refusal`: the refusal direction of every hooked layer (Arditi et al., "Refusal in language models is
mediated by a single direction").

Per layer: the mean hooked activation at the last prompt token (where the answer is decided; the chat
template's generation prompt) of the prompts the model refused, minus that of the prompts it answered, over the
`filter` split's English prompts with a refusal label (`sae_engine.refusal`). Writes `refusal.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from offline_pipeline.activation_cache import ActivationCache, as_float
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.choose import load_choice
from offline_pipeline.stages.hooks import hook_name


def labelled_prompts(records: list[dict]) -> tuple[list[int], np.ndarray]:
    """(record indices, refused) of the filter split's English prompts that carry a refusal label."""
    chosen = [i for i, r in enumerate(records) if r["split"] == "filter" and r["kind"] == "prompt" and r.get("refused") is not None]
    return chosen, np.array([bool(records[i]["refused"]) for i in chosen])


def refusal_direction(cache: ActivationCache, hook: str, records: list[int], refused: np.ndarray) -> np.ndarray:
    """mean(refused) - mean(answered) of the activations at each record's last prompt token."""
    last = cache.answer_start[np.asarray(records, dtype=np.int64)] - 1
    order = np.argsort(last)
    acts = np.empty((len(last), cache.acts(hook).shape[1]), dtype=np.float32)
    acts[order] = as_float(cache.acts(hook)[last[order]]).numpy()
    return acts[refused].mean(0) - acts[~refused].mean(0)


def run_refusal(ctx: StageContext) -> dict:
    cache = ActivationCache.open(ctx.input("activations"))
    kind = load_choice(ctx)["hook_kind"]
    records, refused = labelled_prompts(cache.records)
    directions = {}
    if refused.any() and (~refused).any():
        for layer in ctx.preset.layers:
            hook = hook_name(layer, kind)
            direction = refusal_direction(cache, hook, records, refused)
            directions[str(layer)] = {
                "hook_name": hook,
                "direction": direction.tolist(),
                "norm": float(np.linalg.norm(direction)),
                "n_refused": int(refused.sum()),
                "n_answered": int((~refused).sum()),
            }
    write_json_atomic(ctx.out / "refusal.json", directions)
    return {"layers": len(directions), "refused": int(refused.sum()), "answered": int((~refused).sum()),
            "norms": {layer: round(d["norm"], 3) for layer, d in directions.items()}}


def load_directions(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "refusal.json").read_text())
