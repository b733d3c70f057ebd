"""The htmx side of the route layer: partial responses, form bodies, toasts, and errors as HTML.

The pages ask for server-rendered partials with htmx (its requests carry `HX-Request: true`). A partial
route reads the same query functions as its JSON twin and renders the result with a template under
`templates/partials/`. An error on the way (a 4xx naming the field, a 401 without the API token, a full
queue) reaches the page as a banner and a toast instead of JSON: `for_pages` wraps the app's JSON error
handlers, so both kinds of client read the same message.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from app.deps import field_error, templates
from app.render import error_text, render

# A request that wants its error as a banner in its own target (else only a toast, and nothing swapped).
INLINE_ERRORS = "X-StarMap-Errors"
FORM_TYPE = "application/x-www-form-urlencoded"


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def require_htmx(request: Request) -> None:
    """The pages' form routes that run the model or write answer only htmx's own requests: another site's
    page can post a plain form to a loopback server, but cannot add the `HX-Request` header without a CORS
    preflight, which this server never grants (the JSON API is safe the same way: it takes JSON bodies only)."""
    if not is_htmx(request):
        raise HTTPException(403, detail=[{"loc": ["header", "HX-Request"], "type": "value_error",
                                          "msg": "this route answers the page's own requests (HX-Request: true)"}])


HtmxOnly = Depends(require_htmx)


def partial(request: Request, name: str, context: Mapping[str, Any] | None = None, status_code: int = 200,
            headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """A partial template as the response (`request` and `set_id` are in every partial's context)."""
    return templates.TemplateResponse(request, name, {"request": request, **(context or {})}, status_code=status_code,
                                      headers=dict(headers or {}))


def toast(message: str) -> str:
    """An out-of-band toast, to append to any partial."""
    return render("partials/toast.html", message=message)


def with_toast(response: HTMLResponse, message: str) -> HTMLResponse:
    response.body = response.body + toast(message).encode()
    response.headers["content-length"] = str(len(response.body))
    return response


async def form_fields(request: Request) -> dict[str, list[str]]:
    """A form body (htmx sends `application/x-www-form-urlencoded`) as lists of values per name."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    body = await request.body()
    if body and content_type != FORM_TYPE:
        raise field_error(415, "content-type", f"send the form as {FORM_TYPE}", "header")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def first(fields: Mapping[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = fields.get(name)
    return values[0] if values else default


def validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """A request model of the API from form strings (numbers and check boxes parsed); a validation error is
    the 422 the API answers, naming the field."""
    try:
        return model.model_validate(body, strict=False)
    except ValidationError as error:
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        raise HTTPException(422, detail=detail) from None


def error_response(request: Request, status_code: int, message: str, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """An error for a page: a banner swapped into the request's target when it asked for that, else a toast only."""
    extra = {k: v for k, v in (headers or {}).items() if k.lower() in ("retry-after", "www-authenticate")}
    if request.headers.get(INLINE_ERRORS) != "inline":
        extra["HX-Reswap"] = "none"
    return partial(request, "partials/error.html", {"message": message}, status_code=status_code, headers=extra)


def for_pages(handler: Callable[[Request, Any], Awaitable[Response]]) -> Callable[[Request, Any], Awaitable[Response]]:
    """An exception handler of the JSON API that answers htmx requests with the same message as HTML."""

    async def handle(request: Request, error: Any) -> Response:
        response = await handler(request, error)
        if not is_htmx(request) or not isinstance(response, JSONResponse) or response.status_code < 400:
            return response
        try:
            detail = json.loads(response.body).get("detail", "")
        except (ValueError, AttributeError):
            detail = response.body.decode(errors="replace")
        return error_response(request, response.status_code, error_text(detail), response.headers)

    return handle
