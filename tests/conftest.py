"""Shared fixtures: one data directory per test session, tiny random models, the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("STARMAP_DATA_DIR", "/tmp/starmap-test-data"))
os.environ["STARMAP_DATA_DIR"] = str(DATA_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: integration tests on the real model (over a minute)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_dir(data_dir: Path) -> Path:
    """The de-quantised embedded SmolLM2 folder (model + tokenizer), built once."""
    from sae_engine.models import embedded_model_dir

    return embedded_model_dir(data_dir)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2(data_dir: Path):
    from sae_engine.models import load_model

    return load_model("smollm2", data_dir=data_dir)
