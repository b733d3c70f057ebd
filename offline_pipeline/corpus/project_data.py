"""Where the project's own data files live, and reading them as JSON lines with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

PROJECT_LICENCE = "MIT (StarMap project data)"


class ProjectDataError(ValueError):
    """A project data file breaks its schema; the message names the file, line and field."""


def data_file(name: str) -> Path:
    return Path(str(files("offline_pipeline") / "data" / name))


def read_rows(path: Path, fields: Iterable[str]) -> list[tuple[str, dict]]:
    """(where, object) for every non-blank line, `where` naming the file and line; a field outside `fields` is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"project data file {path} is missing")
    allowed = set(fields)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProjectDataError(f"{where}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ProjectDataError(f"{where}: expected a JSON object")
            unknown = sorted(set(row) - allowed)
            if unknown:
                raise ProjectDataError(f"{where}: unknown field(s) {', '.join(unknown)}")
            rows.append((where, row))
    return rows


def require(row: dict, field: str, kind: type, where: str):
    value = row.get(field)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise ProjectDataError(f"{where}: field {field!r} must be a non-empty {kind.__name__}, got {value!r}")
    return value
