"""The SAE training configuration of a preset, shared by the sweep and the final training."""

from __future__ import annotations

from offline_pipeline.presets import Preset
from sae_engine.training import SAETrainConfig


def train_config(preset: Preset, k: int) -> SAETrainConfig:
    t = preset.train
    return SAETrainConfig(
        k=k,
        expansion_factor=t.expansion_factor,
        batch_size=t.batch_size,
        lr=t.lr,
        dead_after_tokens=t.dead_after_tokens,
        seed=t.seed,
        compute_dtype=preset.dtype,
    )
