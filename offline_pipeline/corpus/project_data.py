"""Where the project's own data files live, and reading them as JSON lines with errors that name the line."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

PROJECT_LICENCE = "MIT (StarMap project data)"


class ProjectDataError(ValueError):
    """A project data file breaks its schema; the message names the file, line and field."""


def data_file(name: str) -> Path:
    return Path(str(files("offline_pipeline") / "data" / name))


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    if not path.is_file():
        raise FileNotFoundError(f"project data file {path} is missing")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProjectDataError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ProjectDataError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    return rows


def require(row: dict, field: str, kind: type, where: str):
    value = row.get(field)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise ProjectDataError(f"{where}: field {field!r} must be a non-empty {kind.__name__}, got {value!r}")
    return value
