"""Bad files at server start-up: each refused with a message naming the file and the problem, none modified.

- SAE checkpoints (truncated, wrong shapes, trained for another model, another width, another size
  than the database's set): the set's checkpoints are refused, the start-up log and /healthz say
  why, and the set stays browsable (map, feature pages) without the live overlay.
- A corrupted SQLite file (not a database, damaged pages, truncated): `create_app` and
  `starmap serve` refuse to start (one line, exit status 2) before anything opens it for writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest
import torch
from fixtures_db import (  # noqa: F401
    D_MODEL,
    D_SAE,
    TinyWorld,
    tiny_world,
)
from hardening_support import copy_database, starmap, starmap_env
from safetensors.torch import load_file, save_file

from app.loopback_server import serve_on_loopback
from sae_engine.checkpoints import save_saelens
from sae_engine.topk import TopKSAE

LAYER = 2
HOOK = f"blocks.{LAYER}.hook_mlp_out"


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def world_with_own_saes(world: TinyWorld, folder: Path) -> tuple[Path, Path]:
    """A database copy whose SAE paths point at a private copy of the checkpoints."""
    saes = folder / "saes"
    shutil.copytree(world.root / "saes", saes)
    database = copy_database(world, folder)
    with sqlite3.connect(database) as db:
        db.execute("UPDATE saes SET checkpoint_path = replace(checkpoint_path, ?, ?)",
                   (str(world.root / "saes"), str(saes)))
    return database, saes / HOOK


def truncate(folder: Path) -> str:
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "unreadable or truncated"


def wrong_shapes(folder: Path) -> str:
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"][:, : D_MODEL // 2].contiguous()
    save_file(weights, folder / "sae_weights.safetensors")
    return f"W_dec has shape ({D_SAE}, {D_MODEL // 2}), expected ({D_SAE}, {D_MODEL})"


def other_model(folder: Path) -> str:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "Qwen/Qwen2.5-3B-Instruct"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return "SAE was trained for 'Qwen/Qwen2.5-3B-Instruct'"


def other_width(folder: Path) -> str:
    sae = TopKSAE(D_MODEL // 2, D_SAE, 16)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    save_saelens(sae, folder, HOOK, "some-other-model")
    return f"SAE input width {D_MODEL // 2} does not match the model's {D_MODEL}"


def other_size(folder: Path) -> str:
    cfg = json.loads((folder / "cfg.json").read_text())
    sae = TopKSAE(D_MODEL, D_SAE * 2, 16)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    save_saelens(sae, folder, HOOK, cfg["metadata"]["model_name"])
    return f"the SAE has {D_SAE * 2} latents, the database's set {D_SAE}"


@pytest.mark.parametrize("damage", [truncate, wrong_shapes, other_model, other_width, other_size],
                         ids=lambda f: f.__name__)
def test_bad_checkpoints_are_refused_and_left_alone(damage, tiny_world: TinyWorld, data_dir: Path, tmp_path: Path,  # noqa: F811
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from app.main import create_app
    from app.state import ServerOptions

    database, folder = world_with_own_saes(tiny_world, tmp_path)
    expected = damage(folder)
    before = fingerprint(tmp_path / "saes")
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": f"sqlite:///{database}"})
    app = create_app(settings, ServerOptions(max_new_tokens=8))
    with caplog.at_level(logging.ERROR, logger="starmap.app"), serve_on_loopback(app) as url:
        live_set = next(s for s in httpx.get(f"{url}/api/sets").json() if s["id"] == tiny_world.set_id)
        chat = httpx.post(f"{url}/api/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4,
                                                   "sae_set": str(tiny_world.set_id)})
        browse = httpx.get(f"{url}/api/map", params={"sae_set": tiny_world.set_id})
    assert not live_set["live"]
    assert str(folder) in live_set["live_error"] and expected in live_set["live_error"], live_set["live_error"]
    assert any(expected in record.getMessage() for record in caplog.records), "the start-up log does not say why"
    assert chat.status_code == 409 and expected in chat.text
    assert browse.status_code == 200 and browse.json()["n"] == len(tiny_world.explained)
    assert fingerprint(tmp_path / "saes") == before, "a refused checkpoint was modified"


def not_a_database(path: Path) -> str:
    path.write_bytes(b"this is not a database, it is a hostile file\n" * 200)
    return r"not a usable SQLite database \(file is not a database\)"


def damaged_pages(path: Path) -> str:
    data = bytearray(path.read_bytes())
    page = 4096
    # Leave the header page alone; scribble over the b-tree pages after it.
    for start in range(2 * page, len(data) - page, 7 * page):
        data[start:start + 64] = b"\xde\xad\xbe\xef" * 16
    path.write_bytes(bytes(data))
    return "database disk image is malformed|integrity check failed"


def scribbled_cell_pointers(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[2 * 4096 + 8:2 * 4096 + 24] = b"\xff" * 16  # page 3's cell pointers: a readable file, a broken b-tree
    path.write_bytes(bytes(data))
    return r"integrity check failed \(.*On tree page 3"


def truncated(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return "database disk image is malformed|integrity check failed"


@pytest.mark.parametrize("damage", [not_a_database, damaged_pages, scribbled_cell_pointers, truncated],
                         ids=lambda f: f.__name__)
def test_corrupted_database_is_refused_at_start_up(damage, tiny_world: TinyWorld, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from app.main import StartupError, create_app

    database = copy_database(tiny_world, tmp_path)
    with sqlite3.connect(database) as db:  # a clean, checkpointed file: every row is in the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    expected = damage(database)
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    settings = tiny_world.settings(data_dir).model_copy(update={"database_url": f"sqlite:///{database}"})
    with pytest.raises(StartupError) as refused:
        create_app(settings)
    message = str(refused.value)
    assert str(database) in message and re.search(expected, message), message
    assert "\n" not in message
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_serve_refuses_a_corrupted_database_in_one_line(tiny_world: TinyWorld, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    database = copy_database(tiny_world, tmp_path)
    not_a_database(database)
    before = database.read_bytes()
    result = starmap("--database-url", f"sqlite:///{database}", "--model", str(tiny_world.model_dir), "serve",
                     "--port", "0", env=starmap_env(data_dir))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and str(database) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert database.read_bytes() == before
