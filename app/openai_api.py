"""StarMap's own OpenAI-compatible endpoint: `POST /v1/chat/completions` (streamed as Server-Sent
Events, or not) and `GET /v1/models`, backed by a local model, so that the embedded chat model can
serve as the explanation and simulation endpoint and any OpenAI client can talk to StarMap.

Honoured: `temperature` (0 = greedy), `top_p`, `max_tokens` / `max_completion_tokens`, `seed`,
`stop`, `response_format` `{"type": "json_object"}` (constrained decoding: the answer is a JSON
object unless `max_tokens` cuts it) and `{"type": "json_schema"}` for the schema subset that
`app.json_constraint.SchemaPrefix` supports (objects of required properties, arrays, bounded
integers, booleans, strings; written in one canonical layout), `logprobs` / `top_logprobs`, `stream_options.include_usage`.
StarMap's extension fields, as in `POST /api/steer` and `POST /api/chat`: `interventions` (SAE-feature and
refusal-direction edits on the live SAE set, applied while generating) and `stop_when` (end the generation on the
first token where a feature fires above a value, with `finish_reason: "feature"`).
Usage is counted with the model's own tokenizer (the chat-templated prompt, the generated tokens).
Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with status
400 for an invalid request (naming the field) and 404 for an unknown model, so that OpenAI clients
show the message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.generation import QueueFull
from app.json_constraint import SchemaError, SchemaPrefix
from app.live import SteeringPlan
from app.local_chat import ChatParams, Delta, Generation, LocalChatModel, TokenInfo
from app.steering import MAX_INTERVENTIONS, ConditionIn, InterventionIn

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS = 4096
MAX_CHARS = 64_000
MAX_MESSAGES = 256
MAX_STOP_CHARS = 256


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str = Field(max_length=MAX_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format.json_schema is required when type is json_schema")
            try:
                SchemaPrefix(self.json_schema.schema_)
            except SchemaError as exc:
                raise ValueError(f"response_format.json_schema: {exc}") from None
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator accepts
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    interventions: list[InterventionIn] | None = Field(
        default=None, max_length=MAX_INTERVENTIONS,
        description="StarMap extension: edits on the live SAE set while generating (as in POST /api/steer).")
    stop_when: ConditionIn | None = Field(
        default=None, description='StarMap extension: stop on the first token where this feature fires above `above` '
        '(finish_reason "feature").')

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        return self

    def params(self, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ChatParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        kind = self.response_format.type if self.response_format is not None else "text"
        return ChatParams(
            messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            json_object=kind == "json_object",
            json_schema=self.response_format.json_schema.schema_ if kind == "json_schema" else None,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            stop=[s for s in stop if s],
        )


# Checks the extension fields on the live set; raises FastAPI's field errors (`app.deps.field_error`).
Steering = Callable[[list[InterventionIn], ConditionIn | None], SteeringPlan]


def _field_error(error: HTTPException) -> JSONResponse:
    """A field error of the steering checks, in OpenAI's shape (409 without a live set stays 409)."""
    items = error.detail if isinstance(error.detail, list) else [{"loc": [], "msg": str(error.detail)}]
    names = [".".join(str(p) for p in item.get("loc", []) if p != "body") for item in items]
    message = "; ".join(f"{name}: {item['msg']}" if name else item["msg"] for name, item in zip(names, items))
    return _error(400 if error.status_code == 422 else error.status_code, message, names[0] or None)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class OpenAIErrorRoute(APIRoute):
    """Routes whose validation and HTTP errors are answered in OpenAI's error format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                problems = []
                for error in exc.errors():
                    location = ".".join(str(part) for part in error["loc"] if part != "body")
                    problems.append(f"{location}: {error['msg']}" if location else error["msg"])
                first = exc.errors()[0]["loc"] if exc.errors() else ()
                param = ".".join(str(p) for p in first if p != "body") or None
                return _error(400, "; ".join(problems), param)
            except StarletteHTTPException as exc:  # FastAPI raises Starlette's for an unreadable body
                response = _error(exc.status_code, str(exc.detail))
                response.headers.update(exc.headers or {})
                return response

        return route


def _logprob_content(infos: list[TokenInfo]) -> list[dict[str, Any]]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in infos]


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def _finish_reason(generation: Generation) -> str:
    return generation.finish_reason if generation.finish_reason in ("length", "feature") else "stop"


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


# One event of a streamed completion: a JSON chunk, or the final "[DONE]".
STREAM_CHUNK = {"type": "object", "required": ["data"],
                "properties": {"event": {"const": "message"}, "data": {"type": "string"}}}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIError, "description": "Invalid request; `error.param` names the field."},
    401: {"model": OpenAIError, "description": "The server is bound beyond loopback and the request lacks the API token."},
}


def openai_router(
    generator: LocalChatModel,
    dependencies: Sequence[Any] = (),
    max_tokens: int = MAX_TOKENS,
    max_prompt_tokens: int | None = None,
    steering: Steering | None = None,
) -> APIRouter:
    """The `/v1` routes, serving `generator`'s model under its name (and aliases); `dependencies` guard every
    route; a request may generate at most `max_tokens` after a prompt of at most `max_prompt_tokens`;
    `steering` checks the extension fields against the live SAE set (without it they are refused)."""
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute, dependencies=list(dependencies),
                       responses=ERRORS if dependencies else {400: ERRORS[400]})

    @router.get("/models", summary="The served model (OpenAI format)")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "starmap"} for name in generator.names],
        }

    example = {"model": generator.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}

    @router.post("/chat/completions", summary="Chat completion (OpenAI format), streamed with stream=true",
                 responses={200: {"content": {"text/event-stream": {"schema": STREAM_CHUNK}},
                                  "description": "A completion; with stream=true an SSE stream of chunks, then [DONE]."},
                            404: {"model": OpenAIError, "description": "The model is not served here."},
                            503: {"model": OpenAIError, "description": "The generation queue is full; retry after "
                                  "`Retry-After` seconds.", "headers": {"Retry-After": {"schema": {"type": "integer"}}}}})
    async def chat_completions(request: ChatCompletionRequest = Body(examples=[example])) -> Any:  # noqa: B008
        if request.model not in generator.names:
            raise HTTPException(
                status_code=404,
                detail=f"model {request.model!r} is not served here; available: {', '.join(generator.names)}",
            )
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None and asked > max_tokens:
            name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            return _error(400, f"{name}: at most {max_tokens} on this server", name)
        params = request.params(min(DEFAULT_MAX_TOKENS, max_tokens))
        if max_prompt_tokens is not None and (n := len(generator.prompt_ids(params.messages))) > max_prompt_tokens:
            return _error(400, f"messages: the prompt is {n} tokens; at most {max_prompt_tokens}", "messages")
        if request.interventions or request.stop_when:
            if steering is None:
                return _error(400, "interventions: this server has no SAE set to steer with", "interventions")
            try:
                params.steering = steering(request.interventions or [], request.stop_when)
            except HTTPException as error:
                return _field_error(error)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            if request.stream:
                include_usage = bool(request.stream_options and request.stream_options.include_usage)
                return StreamingResponse(
                    _stream(generator.stream(params), params, completion_id, created, request.model, include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            generation = await generator.generate(params)
        except QueueFull as error:
            response = _error(503, str(error))
            response.headers["Retry-After"] = str(error.retry_after)
            return response
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "logprobs": None
                    if generation.logprobs is None
                    else {"content": _logprob_content(generation.logprobs)},
                    "finish_reason": _finish_reason(generation),
                }
            ],
            "usage": _usage(generation),
        }

    return router


def openai_app(generator: LocalChatModel, **router_options: Any) -> FastAPI:
    """A bare app serving only the `/v1` routes (benchmarks, tests): it starts and stops `generator`'s queue."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await generator.queue.start()
        try:
            yield
        finally:
            await generator.queue.stop()

    app = FastAPI(lifespan=lifespan)
    app.include_router(openai_router(generator, **router_options))
    return app


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _stream(
    items: AsyncIterator[Delta | Generation], params: ChatParams, completion_id: str, created: int, model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    yield _sse(chunk({"role": "assistant", "content": ""}))
    async for item in items:
        if isinstance(item, Delta):
            logprobs = {"content": _logprob_content(item.logprobs)} if params.logprobs else None
            yield _sse(chunk({"content": item.text}, logprobs=logprobs))
        else:
            yield _sse(chunk({}, finish_reason=_finish_reason(item)))
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(item),
                    }
                )
    yield _sse("[DONE]")
