"""Shared by the hardening tests: `starmap serve` in its own process, and private copies of the tiny world.

A server in a subprocess is what a user runs: it can be SIGKILLed, its memory measured, and its
command line checked, none of which a server thread inside pytest allows.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fixtures_db import TinyWorld

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_database(world: TinyWorld, folder: Path, name: str = "starmap.db") -> Path:
    """A private copy of the world's database (its checkpoint paths are absolute, so the set stays live)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copy(world.root / "starmap.db", target)
    return target


def starmap_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STARMAP_")}
    # One intra-op thread: the tiny model's ops are microseconds, and this machine is shared.
    env.update(STARMAP_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def starmap(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starmap.cli", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@contextmanager
def serve(world: TinyWorld, database: Path, data_dir: Path, log: Path, *options: str, host: str = "127.0.0.1",
          env: dict[str, str] | None = None, timeout_s: float = 180) -> Iterator[ServerProcess]:
    """`starmap serve` on the tiny model and `database`; yields once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "starmap.cli", "--database-url", f"sqlite:///{database}", "--model",
               str(world.model_dir), "--device", "cpu", "--dtype", "float32", "serve", "--host", host,
               "--port", str(port), *options]
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env or starmap_env(data_dir), stdout=sink,
                                   stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"starmap serve exited with {process.returncode}:\n{server.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"starmap serve did not answer in {timeout_s} s:\n{server.output()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
