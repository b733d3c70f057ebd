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


@pytest.fixture(scope="session")
def tiny_run(data_dir: Path, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted `starmap pipeline run --preset tiny` (its SQLite database and run folder), the reference
    of every pipeline test that resumes, crashes, re-writes or re-seeds a run."""
    from pipeline_support import TinyRun, run_tiny

    root = tmp_path_factory.mktemp("tiny-run")
    run = TinyRun(run_dir=root / "clean", db=root / "clean.db")
    run_tiny(data_dir, run.run_dir, run.db)
    return run


@pytest.fixture(autouse=True)
def _tiny_world_on_one_thread(request: pytest.FixtureRequest):
    """A test on the tiny world (its server included) runs torch on one thread, and only that test: the
    SmolLM2 and Qwen tests keep the machine's cores."""
    if "tiny_world" not in request.fixturenames:
        yield
        return
    from fixtures_db import single_thread_torch

    with single_thread_torch():
        yield
