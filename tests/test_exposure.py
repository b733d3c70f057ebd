"""Exposure: loopback by default; bound beyond it, model runs and writes need the API token; no path traversal.

- `starmap serve --host 0.0.0.0` without STARMAP_API_TOKEN refuses to start (one line, status 2).
- A real `starmap serve --host 0.0.0.0` with a token: chat, steering, trace, compare, preset writes and
  the OpenAI-compatible `/v1` answer 401 without `Authorization: Bearer <token>` (or with a wrong one,
  another scheme, or the token in the query string) and work with it; reads stay open; the pages
  carry a token field and the chat works from the browser once the token is entered.
- No route serves a file named by the request: the only file route is the `/static` mount
  (Starlette's StaticFiles, which resolves and confines paths); encoded `..` in it and in every
  path-taking parameter answers 4xx and never a file from outside `static/`.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import (
    REPO,
    ServerProcess,
    copy_database,
    serve,
    starmap,
    starmap_env,
)

from app.access import is_loopback

TOKEN = "exposure-test-token-91c2"
USER = [{"role": "user", "content": "Hello there"}]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.org", "127.0.0.1.nip.io"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_refuses_an_exposed_host_without_a_token(host: str, tiny_world: TinyWorld, data_dir: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    database = copy_database(tiny_world, tmp_path)
    result = starmap("--database-url", f"sqlite:///{database}", "--model", str(tiny_world.model_dir), "serve",
                     "--host", host, "--port", "0", env=starmap_env(data_dir))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"refusing to serve on {host} without an API token" in result.stderr and "STARMAP_API_TOKEN" in result.stderr


@pytest.fixture(scope="module")
def exposed(tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811
    folder = tmp_path_factory.mktemp("exposed")
    database = copy_database(tiny_world, folder)
    with serve(tiny_world, database, data_dir, folder / "server.log", "--max-new-tokens", "8", host="0.0.0.0",
               env=starmap_env(data_dir, STARMAP_API_TOKEN=TOKEN)) as process:
        yield process


def guarded(world: TinyWorld) -> list[tuple[str, str, dict | None, int]]:
    """(method, path, JSON body, success status) of every route that runs the model or writes."""
    fid = world.safety[0]
    preset = {"name": "exposure", "interventions": [{"feature": fid, "mode": "ablate"}]}
    return [
        ("POST", "/api/chat", {"messages": USER, "max_new_tokens": 2}, 200),
        ("POST", "/api/steer", {"messages": USER, "max_new_tokens": 2, "interventions": preset["interventions"]}, 200),
        ("POST", "/api/trace", {"prompt": "hello"}, 200),
        ("POST", "/api/compare", {"prompt_a": "hello", "prompt_b": "goodbye"}, 200),
        ("POST", "/api/presets", preset, 201),
        ("DELETE", "/api/presets/exposure", None, 204),
        ("GET", "/v1/models", None, 200),
        ("POST", "/v1/chat/completions", {"model": str(world.model_dir), "messages": USER, "max_tokens": 2}, 200),
    ]


def test_exposed_server_needs_the_token_to_run_the_model_or_write(exposed: ServerProcess,
                                                                  tiny_world: TinyWorld) -> None:  # noqa: F811
    assert "warning: binding 0.0.0.0 exposes" in exposed.output()
    bad_credentials = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                       {"Authorization": TOKEN}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}]
    with httpx.Client(base_url=exposed.url, timeout=120) as http:
        for method, path, body, success in guarded(tiny_world):
            for headers in bad_credentials:
                refused = http.request(method, path, json=body, headers=headers, params={"token": TOKEN})
                assert refused.status_code == 401, (method, path, headers, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer" in refused.text
            allowed = http.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == success, (method, path, allowed.text)
        for path in ("/healthz", "/api/sets", "/api/map", "/api/features", f"/api/features/{tiny_world.explained[0]}",
                     "/api/presets", "/", "/map", "/steer", "/trace", f"/features/{tiny_world.explained[0]}"):
            assert http.get(path).status_code == 200, path
        page = http.get("/").text
        assert 'id="api-token"' in page
        spec = http.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["StarMapToken"]["scheme"] == "bearer"
        assert spec["paths"]["/api/chat"]["post"]["security"] == [{"StarMapToken": []}]
        assert "security" not in spec["paths"]["/api/map"]["get"]


def test_the_pages_partials_that_run_the_model_or_write_need_the_token(exposed: ServerProcess,
                                                                      tiny_world: TinyWorld) -> None:  # noqa: F811
    """The pages' htmx routes are guarded as their JSON twins; refused, they answer the page in HTML."""
    fid = tiny_world.safety[0]
    forms = [
        ("/chat/turn", {"message": "Hello", "max_new_tokens": "2"}),
        ("/trace/results", {"prompt_a": "hello"}),
        ("/steer/run", {"prompt": "hello", "max_new_tokens": "2", "interventions.0.feature": fid, "interventions.0.mode": "ablate"}),
        ("/steer/presets/save", {"name": "exposure page", "interventions.0.feature": fid, "interventions.0.mode": "ablate"}),
        ("/steer/presets/delete", {"name": "exposure page"}),
    ]
    with httpx.Client(base_url=exposed.url, timeout=120, headers={"HX-Request": "true"}) as http:
        for path, form in forms:
            refused = http.post(path, data=form, headers={"Authorization": "Bearer wrong-token"})
            assert refused.status_code == 401 and refused.headers["content-type"].startswith("text/html"), (path, refused.text)
            assert "Authorization: Bearer" in refused.text and 'class="banner"' in refused.text
            allowed = http.post(path, data=form, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == 200, (path, allowed.text)
        # Reads and the panel's cookie need no token; a chat's stream is admitted by its one-time id.
        assert http.get("/map/search", params={"q": "fixture"}).status_code == 200
        assert http.post("/steer/panel/add", data={"feature": fid}).status_code == 200


def test_the_pages_send_the_token_once_entered(exposed: ServerProcess) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(base_url=exposed.url)
        page.goto("/")
        page.fill("#message", "Hello")
        page.fill("#max-new", "4")
        page.click("#send")
        page.wait_for_selector("#transcript .banner", timeout=60_000)
        assert "Authorization: Bearer" in page.inner_text("#transcript .banner")
        page.fill("#api-token", TOKEN)
        page.dispatch_event("#api-token", "change")
        page.fill("#message", "Hello")
        page.click("#send")
        page.wait_for_selector("#chat-stream .stream-end[data-done='done']", state="attached", timeout=60_000)
        assert page.locator(".tok.gen").count() >= 1
        browser.close()


TRAVERSALS = [
    "/static/..%2F..%2Fpyproject.toml",
    "/static/..%2fapp%2fmain.py",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../etc/passwd",
    "/static/js/../../pyproject.toml",
    "/static/js/..%2F..%2F..%2Fpyproject.toml",
    "/static/%252e%252e%252fapp%252fmain.py",
    "/static/....//....//etc/passwd",
    "/static//etc/passwd",
    "/static/js%5C..%5C..%5Cpyproject.toml",
    "/static/..%5C..%5Cpyproject.toml",
    "/static/%00../../etc/passwd",
    "/features/..%2F..%2Fetc%2Fpasswd",
    "/features/..%2F..%2Fpyproject.toml?sae_set=1",
    "/api/features/..%2F..%2Fpyproject.toml",
    "/api/presets/..%2F..%2Fetc%2Fpasswd",
    "/api/presets/..%2F..%2Fpyproject.toml",
    "/api/map?sae_set=..%2F..%2Fetc%2Fpasswd",
    "/?sae_set=..%2F..%2Fpyproject.toml",
]
OUTSIDE = ["root:x:0:0", "[project]", "The StarMap web app"]


def raw_get(url: str, path: str) -> tuple[int, str]:
    """GET `path` exactly as written (no client-side normalisation of `..` or of escapes)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_no_route_serves_a_file_named_by_the_request(exposed: ServerProcess) -> None:
    status, body = raw_get(exposed.url, "/static/js/common.js")
    assert status == 200 and body == (REPO / "static" / "js" / "common.js").read_text()
    for path in TRAVERSALS:
        status, body = raw_get(exposed.url, path)
        assert 400 <= status < 500, (path, status, body[:200])
        assert not any(marker in body for marker in OUTSIDE), (path, body[:200])
