"""The resumable stage runner.

A run lives in `<data_dir>/runs/<run_key>/` (run key = preset name + a hash of the whole preset).
Each stage writes into its own folder `<stage>-<key>/`, key = hash of the stage's name, version,
its slice of the preset and the folder names of the stages it reads. A stage marks completion by
writing `DONE.json` last, atomically (write beside, then rename). So:

- a re-run skips every stage whose folder holds a `DONE.json`;
- a killed run leaves at most one folder without `DONE.json`; the next run wipes and redoes it;
- changing a stage's settings changes its key, hence its folder and those of every stage after it;
- `force` re-runs the named stages and every stage downstream of them;
- `reuse` names other run folders: a stage whose folder (same key, hence same inputs and settings) is
  finished there is hard-linked into this run instead of recomputed (a new seed keeps the corpus and
  the activations). The database stage is never reused: its output is rows, not files.

An exclusive `flock` on `<run>/LOCK` stops two processes from running the same run at once; the
kernel drops it when a process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DONE = "DONE.json"


class PipelineError(RuntimeError):
    """A stage cannot run: missing input, bad configuration, or another process holds the run."""


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    config: Callable[[Any], Any]  # the slice of the preset this stage depends on
    run: Callable[[StageContext], dict]  # writes into ctx.out, returns a JSON summary
    version: int = 1
    reusable: bool = True  # False: its work is not in its folder, so another run's folder cannot stand in


@dataclass
class StageContext:
    preset: Any
    settings: Any
    run_dir: Path
    out: Path
    inputs: dict[str, Path]

    def input(self, name: str) -> Path:
        return self.inputs[name]

    def done(self, name: str) -> dict:
        return json.loads((self.inputs[name] / DONE).read_text())


def stable_hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def write_json_atomic(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def stage_folders(stages: Sequence[Stage], preset: Any, run_dir: Path) -> dict[str, Path]:
    """The folder of every stage, derived from the preset alone (nothing runs)."""
    folders: dict[str, Path] = {}
    for stage in stages:
        missing = [name for name in stage.inputs if name not in folders]
        if missing:
            raise PipelineError(f"stage {stage.name!r} reads {missing}, which no earlier stage produces")
        key = stable_hash(
            {
                "stage": stage.name,
                "version": stage.version,
                "config": stage.config(preset),
                "inputs": {name: folders[name].name for name in stage.inputs},
            }
        )
        folders[stage.name] = run_dir / f"{stage.name}-{key}"
    return folders


def downstream(stages: Sequence[Stage], names: Sequence[str]) -> set[str]:
    """The named stages and every stage that reads one of them, directly or not."""
    known = {s.name for s in stages}
    unknown = sorted(set(names) - known)
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; stages are {', '.join(s.name for s in stages)}")
    selected = set(names)
    for stage in stages:
        if selected & set(stage.inputs):
            selected.add(stage.name)
    return selected


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "LOCK", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another process is running the pipeline in {run_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class StageStatus:
    name: str
    folder: Path
    done: bool
    seconds: float | None
    summary: dict | None


def status(stages: Sequence[Stage], preset: Any, run_dir: Path) -> list[StageStatus]:
    out = []
    folders = stage_folders(stages, preset, run_dir)
    for stage in stages:
        folder = folders[stage.name]
        marker = folder / DONE
        info = json.loads(marker.read_text()) if marker.is_file() else None
        out.append(StageStatus(stage.name, folder, info is not None, info and info["seconds"], info and info["summary"]))
    return out


def _finished_in(runs: Sequence[Path], folder: Path) -> Path | None:
    """The first of `runs` holding a finished stage folder of the same name (same key) as `folder`."""
    return next((run / folder.name for run in runs if (run / folder.name / DONE).is_file()), None)


def _link_folder(source: Path, folder: Path) -> None:
    """Hard-link (copy where links cannot cross file systems) `source` into `folder`, DONE.json last."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, folder, copy_function=link, ignore=shutil.ignore_patterns(DONE))
    link(str(source / DONE), str(folder / DONE))


def run_stages(
    stages: Sequence[Stage],
    preset: Any,
    settings: Any,
    run_dir: Path,
    force: Sequence[str] = (),
    log: Callable[[str], None] = print,
    reuse: Sequence[Path] = (),
) -> dict[str, Path]:
    """Run every stage that is not done yet; returns each stage's folder."""
    folders = stage_folders(stages, preset, run_dir)
    forced = downstream(stages, force) if force else set()
    with run_lock(run_dir):
        write_json_atomic(run_dir / "preset.json", {"preset": preset.as_dict(), "stages": {k: v.name for k, v in folders.items()}})
        for stage in stages:
            folder = folders[stage.name]
            marker = folder / DONE
            if marker.is_file() and stage.name not in forced:
                log(f"[{stage.name}] done, skipped ({folder.name})")
                continue
            # A folder without DONE.json is what a killed run left behind: start that stage afresh.
            shutil.rmtree(folder, ignore_errors=True)
            source = _finished_in(reuse, folder) if stage.reusable and stage.name not in forced else None
            if source is not None:
                _link_folder(source, folder)
                log(f"[{stage.name}] done in {source.parent}, linked ({folder.name})")
                continue
            folder.mkdir(parents=True)
            log(f"[{stage.name}] running -> {folder.name}")
            started = time.perf_counter()
            ctx = StageContext(preset, settings, run_dir, folder, {name: folders[name] for name in stage.inputs})
            summary = stage.run(ctx)
            seconds = time.perf_counter() - started
            write_json_atomic(
                marker,
                {
                    "stage": stage.name,
                    "folder": folder.name,
                    "config": stage.config(preset),
                    "inputs": {name: folders[name].name for name in stage.inputs},
                    "seconds": round(seconds, 2),
                    "finished_at": datetime.now(timezone.utc).isoformat(),
                    "summary": summary,
                },
            )
            log(f"[{stage.name}] finished in {seconds:.1f} s")
    return folders
