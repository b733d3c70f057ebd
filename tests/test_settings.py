"""Settings: environment variables with the STARMAP_ prefix, overridden by global CLI options."""

import subprocess
import sys
from pathlib import Path

from starmap.settings import Settings


def test_environment_is_read_with_the_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("STARMAP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STARMAP_MODEL", "/models/x")
    monkeypatch.setenv("STARMAP_DEVICE", "cpu")
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.model == "/models/x" and settings.device == "cpu"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'starmap.db'}"
    monkeypatch.setenv("STARMAP_DATABASE_URL", "postgresql://u@h/db")
    assert Settings().resolved_database_url == "postgresql://u@h/db"


def test_cli_options_override_the_environment(tmp_path):
    code = (
        "from typer.testing import CliRunner; from starmap.cli import app, settings_of; import typer\n"
        "@app.command('print-settings')\n"
        "def show(ctx: typer.Context):\n"
        "    s = settings_of(ctx); print(s.data_dir, s.model, s.device)\n"
        "r = CliRunner().invoke(app, ['--data-dir', '/x/y', '--device', 'cuda:1', 'print-settings'])\n"
        "print(r.output)"
    )
    env = {"STARMAP_DATA_DIR": str(tmp_path), "STARMAP_MODEL": "env-model", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert out.stdout.split() == ["/x/y", "env-model", "cuda:1"], out.stderr
