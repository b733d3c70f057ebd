"""The StarMap web app: `create_app(settings)` builds the FastAPI application.

Start-up (the lifespan) migrates the database, loads the model and, per SAE set, the feature
catalog, the map and (when the set belongs to the loaded model and its checkpoints exist) the
SAEs; then starts the generation worker. Routes reach all of it through `Depends(get_state)`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import routes_chat, routes_features, routes_map, routes_steer, routes_steer_page, routes_trace
from app.access import ExposureError, TokenDep, check_exposure, exposed
from app.deps import ROOT, StateDep, steering_plan
from app.htmx import for_pages
from app.request_errors import database_busy_handler, name_unknown_fields
from app.schemas import HealthOut, SetOut
from app.state import ServerOptions, load_state
from starmap.db.engine import DatabaseFileError, check_sqlite_file
from starmap.settings import Settings

SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
MAX_BODY_BYTES = 4 << 20  # well above the largest valid request (prompts are capped at 4096 tokens)
DESCRIPTION = """\
See and steer the safety features of a language model through sparse autoencoders.
Every page has a JSON twin under `/api`. Feature ids are `"{layer}_{index}"`; activations are
normalised (raw / the feature's ~0.999 quantile). Invalid input answers 4xx with `detail[].loc`
naming the field (an unknown field is refused); a full generation queue, or a database locked by another
writer, answers 503 with `Retry-After`; a body over 4 MiB answers 413.
Bound beyond loopback, the routes that run the model or write need `Authorization: Bearer <STARMAP_API_TOKEN>`.
"""


class ServerTiming:
    """Adds `Server-Timing: app;dur=<ms>` (time to the response headers) to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                duration = f"app;dur={(time.perf_counter() - started) * 1000:.3f}"
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", duration.encode())]}
            await send(message)

        await self.app(scope, receive, timed_send)


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says why in one line."""


def preflight(settings: Settings) -> None:
    """Refuse to build a server that would be exposed without a token or would open a bad database."""
    url = settings.resolved_database_url
    try:
        settings.ensure_data_dir()  # the model cache lives there, and the default database
    except OSError as error:
        raise StartupError(f"data directory {settings.data_dir}: {error.strerror or error}") from None
    try:
        check_exposure(settings)
        make_url(url)
        check_sqlite_file(url)
    except (ExposureError, DatabaseFileError) as error:
        raise StartupError(str(error)) from None
    except ArgumentError as error:
        raise StartupError(f"database URL {url!r} is not a SQLAlchemy URL ({error})") from None


def _json_safe(value: Any) -> Any:
    """An invalid input, echoed back in a validation error, as JSON can carry it: Python's json reads NaN,
    infinities and lone surrogates (`"\\ud800"`), which JSON numbers and UTF-8 cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _json_safe(name_unknown_fields(request, jsonable_encoder(error.errors())))},
                        status_code=422)


def _open_schema(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The schema of a loopback server, which asks no token: without the bearer scheme and the 401s."""
    schema = build()  # FastAPI's, cached until the routes change (the /v1 routes join at start-up)
    schema.get("components", {}).pop("securitySchemes", None)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
    return schema


def create_app(settings: Settings, options: ServerOptions | None = None) -> FastAPI:
    """The app; raises `StartupError` for a configuration it must not serve."""
    options = options or ServerOptions()
    preflight(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(load_state, settings, options)
        app.state.starmap = state
        if state.model is not None:
            from app.local_chat import LocalChatModel
            from app.openai_api import openai_router

            app.include_router(openai_router(LocalChatModel(state.model, state.queue), dependencies=[TokenDep],
                                             max_tokens=options.max_new_tokens,
                                             max_prompt_tokens=options.max_prompt_tokens,
                                             steering=functools.partial(steering_plan, state)))
        await state.queue.start()
        try:
            yield
        finally:
            await state.queue.stop()
            state.close()

    # /docs is served from local assets (static/vendor, built by `make assets`), never from a CDN.
    app = FastAPI(title="StarMap", description=DESCRIPTION, version="0.1.0", lifespan=lifespan, docs_url=None,
                  max_body_size=MAX_BODY_BYTES)
    app.add_middleware(ServerTiming)
    # The pages' htmx requests get the same errors as HTML (a banner and a toast); the API keeps its JSON.
    app.add_exception_handler(RequestValidationError, for_pages(validation_error))
    app.add_exception_handler(OperationalError, for_pages(database_busy_handler(options.db_lock_timeout_s)))
    app.add_exception_handler(StarletteHTTPException, for_pages(http_exception_handler))

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette names only the first route of the path in Allow; list every route's methods.
        path = request.scope["path"]
        methods = sorted({method for route in iter_route_contexts(app.routes) if route.methods
                          and route.path_regex.match(path) for method in route.methods})
        return JSONResponse({"detail": error.detail}, status_code=405, headers={"Allow": ", ".join(methods)})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        missing = [name for name in SWAGGER_FILES if not (ROOT / "static" / "vendor" / name).is_file()]
        if missing:
            return HTMLResponse(
                f"<h1>API documentation assets missing</h1><p>static/vendor lacks {', '.join(missing)}: run "
                "<code>make assets</code>. The schema itself is at <a href='/openapi.json'>/openapi.json</a>.</p>",
                status_code=503,
            )
        return get_swagger_ui_html(openapi_url="/openapi.json", title="StarMap API",
                                   swagger_js_url="/static/vendor/swagger-ui-bundle.js",
                                   swagger_css_url="/static/vendor/swagger-ui.css",
                                   swagger_favicon_url="data:,")
    if not exposed(settings):
        app.openapi = partial(_open_schema, app.openapi)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    for module in (routes_chat, routes_map, routes_features, routes_trace, routes_steer, routes_steer_page):
        app.include_router(module.router)

    @app.get("/healthz", response_model=HealthOut, summary="Liveness, the loaded model, the SAE sets and the queue")
    async def healthz(state: StateDep) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": state.model.name if state.model else None,
            "model_error": state.model_error,
            "sets": [s.describe() for s in state.sets.values()],
            "queue": state.queue.stats(),
        }

    @app.get("/api/sets", response_model=list[SetOut], summary="The SAE sets in the database")
    async def sets(state: StateDep) -> list[dict[str, Any]]:
        return [s.describe() for s in state.sets.values()]

    return app
