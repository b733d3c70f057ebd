"""Error answers of the `/api` routes that need more than FastAPI's defaults: unknown body fields named
(with the closest known field), and a database locked by another writer answered as busy, not as a fault."""

from __future__ import annotations

import difflib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, get_args, get_origin

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError

from starmap.db.engine import is_lock_timeout

Loc = Sequence[str | int]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside `list[...]`, `X | None`, `Annotated`)."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        if (model := _model_in(argument)) is not None:
            return model
    return None


def _model_at(model: type[BaseModel] | None, path: Loc) -> type[BaseModel] | None:
    """The model holding the field at the end of `path` below `model` (list indices are passed through)."""
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return model


def unknown_field_message(request: Request, loc: Loc) -> str:
    """`unknown field 'max_tokens'; did you mean 'max_new_tokens'?` for a body field the model lacks."""
    name = str(loc[-1])
    body_field = getattr(request.scope.get("route"), "body_field", None)
    body_model = _model_in(body_field.field_info.annotation) if body_field is not None else None
    holder = _model_at(body_model, loc[1:-1]) if loc and loc[0] == "body" else None
    close = difflib.get_close_matches(name, list(holder.model_fields), n=1) if holder is not None else []
    return f"unknown field {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def name_unknown_fields(request: Request, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic says only "Extra inputs are not permitted"; say which field, and what was probably meant."""
    return [{**error, "msg": unknown_field_message(request, error["loc"])} if error.get("type") == "extra_forbidden"
            else error for error in errors]


def database_busy_handler(lock_timeout_s: float) -> Callable[[Request, OperationalError], Awaitable[JSONResponse]]:
    """A handler answering a lock wait that expired (another process is writing the database) with 503 and
    Retry-After, in the generation queue's shape. The request's session was closed on the way out, which
    rolled its transaction back, so nothing of the failed write remains."""
    retry_after = max(1, math.ceil(lock_timeout_s))

    async def database_busy(_request: Request, error: OperationalError) -> JSONResponse:
        if not is_lock_timeout(error):
            raise error  # a real fault: Starlette's 500, with the traceback logged
        return JSONResponse({"detail": f"the database is busy (another process is writing it); retry in {retry_after} s"},
                            status_code=503, headers={"Retry-After": str(retry_after)})

    return database_busy
