"""Presets follow the chosen model: `--model` applies to every preset, layers scale to the model's depth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from offline_pipeline.encoding import sae_precision
from offline_pipeline.presets import PAPER, QUICK, TINY, PresetError, for_model
from offline_pipeline.stages.sae_config import train_config
from sae_engine.models import from_config, tiny_llama_config


def test_quick_runs_the_refusing_default_and_any_model_given(data_dir: Path, smollm2_dir: Path):
    default = for_model(QUICK, None, data_dir)
    assert default.model == "qwen2.5-coder-0.5b" and default.layers == (0, 5, 11, 17, 23)
    assert default.sweep.layers == (11,)
    small = for_model(QUICK, "smollm2", data_dir)
    assert small.layers == (0, 7, 14, 22, 29) and small.sweep.layers == (14,)
    assert small.run_key != default.run_key
    # A preset with fixed layers keeps them on another model, and its own model is only a default.
    assert for_model(TINY, "smollm2", data_dir).layers == TINY.layers
    assert for_model(PAPER, "smollm2", data_dir).sweep.layers == (7, 14, 22)


def test_a_model_that_cannot_be_used_is_one_error_naming_why(data_dir: Path, tmp_path: Path, tokenizer):
    with pytest.raises(PresetError, match="unknown model 'no-such/model'"):
        for_model(QUICK, "no-such/model", data_dir)
    folder = tmp_path / "two-layers"
    from_config(tiny_llama_config(tokenizer, num_hidden_layers=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(PresetError, match=r"has 2 layers \(0-1\); preset 'tiny' hooks layer\(s\) \[2, 3\]"):
        for_model(TINY, str(folder), data_dir)


def test_the_cli_names_the_model_problem(tmp_path: Path, data_dir: Path):
    from typer.testing import CliRunner

    from starmap.cli import app

    result = CliRunner().invoke(
        app, ["--data-dir", str(data_dir), "--database-url", f"sqlite:///{tmp_path / 'x.db'}", "--model", "no-such/model",
              "pipeline", "run", "--preset", "quick", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and "--model: unknown model 'no-such/model'" in result.output, result.output
    assert "[corpus]" not in result.output


def test_the_run_key_hashes_the_precision_auto_means_here(data_dir: Path, smollm2_dir: Path, monkeypatch):
    import sae_engine.models

    keys = {}
    for has_bf16 in (True, False):
        monkeypatch.setattr(sae_engine.models, "cpu_supports_bf16", lambda has_bf16=has_bf16: has_bf16)
        preset = for_model(QUICK, "smollm2", data_dir)
        keys[has_bf16] = preset.run_key
        assert (preset.device, preset.dtype) == ("cpu", "bfloat16" if has_bf16 else "float32")
    # Stages computed in bf16 are never resumed on a machine that would compute them in fp32.
    assert keys[True] != keys[False]
    assert for_model(TINY, "smollm2", data_dir).dtype == "float32"


def test_sae_products_run_in_the_precision_the_run_key_hashes(data_dir: Path, smollm2_dir: Path, monkeypatch):
    import sae_engine.models

    monkeypatch.setattr(sae_engine.models, "cpu_supports_bf16", lambda: True)
    quick, tiny = for_model(QUICK, "smollm2", data_dir), for_model(TINY, "smollm2", data_dir)
    assert (sae_precision(quick), train_config(quick, 8).compute_dtype) == (torch.bfloat16, "bfloat16")
    # A preset that fixes float32 gets float32 SAE products even on a CPU with bf16 (it used to get bf16).
    assert (sae_precision(tiny), train_config(tiny, 8).compute_dtype) == (torch.float32, "float32")
    assert sae_precision(replace(quick, device="cuda")) is None  # the SAE's own parameters' dtype
