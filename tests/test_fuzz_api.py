"""Schemathesis against StarMap's own OpenAPI schema, on a live server (tiny model, private database copy).

Every operation of the schema is fuzzed, the SSE stream of `POST /api/chat` included (Schemathesis
parses `text/event-stream` and checks each event against the documented event schema). Both ways the
server can run are covered: on loopback (no token; the schema declares none) and bound beyond it
(bearer token; Schemathesis also checks that requests without it, or with a wrong one, get 401).

All checks run but one, `positive_data_acceptance` (ST202, "schema-valid request rejected"): validity
that depends on the running server cannot be written in a static schema — the server's own limits
(`--max-new-tokens` below the schema's 4096), the features of the set (a schema-valid feature id the
set does not have), and the served model's name. Those rejections are 4xx naming the field, and the
tests of test_app_api.py / test_hardening_validation.py assert them one by one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import copy_database, serve, starmap_env

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = 15
SEED = 20261121
TOKEN = "fuzz-token-7f3a"


@pytest.fixture(scope="module", params=["loopback", "exposed"])
def server(request, tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[tuple[str, str]]:  # noqa: F811
    folder = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    database = copy_database(tiny_world, folder)
    host, env = "127.0.0.1", starmap_env(data_dir)
    if request.param == "exposed":
        host, env = "0.0.0.0", starmap_env(data_dir, STARMAP_API_TOKEN=TOKEN)
    with serve(tiny_world, database, data_dir, folder / "server.log", "--queue-size", "4", "--max-new-tokens", "16",
               host=host, env=env) as process:
        yield request.param, process.url
        assert "Traceback" not in process.output(), process.output()[-3000:]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: tuple[str, str], tmp_path: Path) -> None:
    mode, url = server
    spec = httpx.get(f"{url}/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method in ("get", "post", "delete"))
    assert ("securitySchemes" in spec.get("components", {})) == (mode == "exposed")
    report = tmp_path / "schemathesis.json"
    command = [str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
               "--workers", "1", "--request-timeout", "60", "--no-shrink", "--report", "json",
               "--report-json-path", str(report)]
    if mode == "exposed":
        command += ["--header", f"Authorization: Bearer {TOKEN}"]
    # Run in tmp_path: Schemathesis and Hypothesis keep their caches in the working directory.
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = json.loads(report.read_text())
    print(f"\nschemathesis ({mode}): {summary['operations']['tested']}/{summary['operations']['total']} operations, "
          f"{summary['test_cases']['generated']} test cases, {summary['test_cases']['with_failures']} with failures, "
          f"{len(summary['errors'])} errors, {summary['running_time']:.0f} s")
    assert result.returncode == 0 and not summary["failures"] and not summary["errors"], result.stdout[-6000:]
    assert summary["operations"]["total"] == summary["operations"]["tested"] == operations, summary["operations"]
    assert summary["test_cases"]["generated"] >= operations * EXAMPLES // 2
