"""Stage `choose`: the hook kind and k the final SAEs use, picked from the sweep or pinned by the preset."""

from __future__ import annotations

import json
from dataclasses import asdict

from offline_pipeline.config_sweep import choose, ranking_table
from offline_pipeline.runner import StageContext, write_json_atomic


def run_choose(ctx: StageContext) -> dict:
    preset = ctx.preset
    if preset.sweep is None:
        if preset.pinned is None:
            raise ValueError(f"preset {preset.name!r} has neither a sweep nor a pinned configuration")
        result = {"hook_kind": preset.pinned[0], "k": preset.pinned[1], "rule": "Pinned by the preset (no sweep).", "ranking": []}
    else:
        rows = json.loads((ctx.input("sweep") / "sweep.json").read_text())
        choice = choose(rows, preset.sweep.reference_threshold, preset.sweep.max_fvu, preset.pinned)
        print(f"selection rule: {choice.rule}\n{ranking_table(choice)}\nchosen: {choice.hook_kind}, k={choice.k}")
        result = asdict(choice)
    write_json_atomic(ctx.out / "choice.json", result)
    return {"hook_kind": result["hook_kind"], "k": result["k"]}


def load_choice(ctx: StageContext) -> dict:
    return json.loads((ctx.input("choose") / "choice.json").read_text())
