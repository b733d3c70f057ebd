"""The preset's language model, loaded for the stages that run it."""

from __future__ import annotations

import shutil
from pathlib import Path

from offline_pipeline.presets import TINY_MODEL, Preset
from sae_engine.models import LoadedModel, embedded_model_dir, load_model


def tiny_model_dir(data_dir: Path) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved once (the `tiny` preset's model)."""
    from transformers import AutoTokenizer

    from sae_engine.models import from_config, tiny_llama_config

    target = Path(data_dir) / "models" / TINY_MODEL
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(Path(data_dir)))
    model = from_config(tiny_llama_config(tokenizer), seed=0).float()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def load_preset_model(preset: Preset, settings) -> LoadedModel:
    if preset.model == TINY_MODEL:
        tiny_model_dir(settings.data_dir)
    return load_model(preset.model, data_dir=settings.data_dir, device=preset.device, dtype=preset.dtype)
