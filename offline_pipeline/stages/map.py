"""Stage `map`: 2-D coordinates of the candidate features from their decoder directions."""

from __future__ import annotations

import numpy as np

from offline_pipeline.feature_map import decoder_map
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.filter import load_passes
from offline_pipeline.stages.train import load_saes


def run_map(ctx: StageContext) -> dict:
    preset = ctx.preset
    passes = load_passes(ctx.input("filter"))
    ids, directions = [], []
    for layer, (_, sae) in load_saes(ctx).items():
        for feature in sorted({p.feature for p in passes[layer]}):
            ids.append(f"{layer}_{feature}")
            directions.append(sae.W_dec[feature].detach().float().cpu().numpy())
    coords = decoder_map(np.array(directions), preset.map) if len(ids) >= 3 else np.zeros((0, 2))
    if len(ids) and len(coords) != len(ids):
        raise ValueError(f"the map needs at least 3 candidate features, the filter found {len(ids)}")
    result = {"description": preset.map.description, "coords": {fid: [float(x), float(y)] for fid, (x, y) in zip(ids, coords)}}
    write_json_atomic(ctx.out / "map.json", result)
    return {"features": len(ids), "description": preset.map.description}
