"""The preset's language model, loaded for the stages that run it."""

from __future__ import annotations

from offline_pipeline.presets import Preset
from sae_engine.models import LoadedModel, load_model


def load_preset_model(preset: Preset, settings) -> LoadedModel:
    return load_model(preset.model, data_dir=settings.data_dir, device=preset.device, dtype=preset.dtype)
