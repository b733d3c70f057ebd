"""The chat page, its streamed JSON twin `POST /api/chat` (Server-Sent Events of JSON), and the page's own
stream of rendered HTML for htmx's SSE extension.

Both streams run the same job (`live.chat_job`, checked and built by `chat_work`), so their token overlays
are identical; only the encoding differs. The page sends its message with `POST /chat/turn` (a form, with
the API token when the server asks for one); the answer is a stream element whose `sse-connect` names a
one-time stream id, and the EventSource's `GET /chat/stream/{id}` starts the job. An EventSource cannot
send headers, so the id, handed out to the authorised POST, is what admits the GET. Closing it (leaving the
page, a new chat) cancels the generation, as closing `/api/chat` does.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from app import live
from app.access import TokenDep
from app.deps import (
    SetQuery,
    StateDep,
    errors,
    field_error,
    live_set,
    page_context,
    queue_full,
    stop_condition,
    templates,
)
from app.generation import Job, QueueFull, Sampling, sse
from app.htmx import HtmxOnly, first, form_fields, partial, validated
from app.render import html_event, render
from app.schemas import ChatRequest
from app.state import AppState, SetRuntime

router = APIRouter()

# One event of the stream (OpenAPI 3.1 has no itemSchema; SSE-aware tools read `schema` per event).
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["queued", "features", "prompt", "token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A page's stream waits this long for its EventSource; at most this many wait at once (the oldest go first).
PENDING_TTL_S = 120.0
MAX_PENDING = 64


@dataclass
class ChatRun:
    """A checked chat request: the set it runs on and the job that answers it."""

    runtime: SetRuntime
    messages: list[dict[str, str]]
    work: Callable[[Job], dict]


def chat_work(body: ChatRequest, state: AppState) -> ChatRun:
    """The server's limits on a chat request and the job that answers it (422/404/409 naming the field)."""
    options = state.options
    if body.max_new_tokens > options.max_new_tokens:
        raise field_error(422, "max_new_tokens", f"at most {options.max_new_tokens} on this server")
    if len(body.messages) > options.max_messages:
        raise field_error(422, "messages", f"at most {options.max_messages} messages")
    for i, message in enumerate(body.messages):
        if len(message.content) > options.max_message_chars:
            raise field_error(422, f"messages.{i}.content", f"at most {options.max_message_chars} characters")
    model, runtime = live_set(state, body.sae_set)
    if body.domains is not None:
        unknown = sorted(set(body.domains) - set(runtime.masks.by_domain))
        if unknown:
            raise field_error(422, "domains", f"unknown domains {unknown}; this set has {sorted(runtime.masks.by_domain)}")
    messages = [m.model_dump() for m in body.messages]
    prompt = live.encode_prompt(model, messages)
    if len(prompt.ids) > options.max_prompt_tokens:
        raise field_error(422, "messages", f"the prompt is {len(prompt.ids)} tokens; at most {options.max_prompt_tokens}")
    sampling = Sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed)
    stop_when = stop_condition(runtime, body.stop_when)
    return ChatRun(runtime, messages, live.chat_job(model, runtime, prompt, sampling, body.domains, body.top_n, stop_when))


def ahead_of(state: AppState) -> int:
    return state.queue.waiting + (1 if state.queue.running else 0)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page(request: Request, state: StateDep, sae_set: SetQuery = None):
    runtime = state.resolve_set(sae_set) if state.sets else None
    return templates.TemplateResponse(request, "chat.html", page_context(
        request, state, runtime, page="chat", max_new_tokens=state.options.max_new_tokens,
    ))


@router.post(
    "/api/chat",
    response_class=StreamingResponse,
    summary="Chat with the per-token feature overlay (streamed)",
    description="Generates an answer to `messages` token by token and streams Server-Sent Events "
    "(`text/event-stream`).\n\n" + live.STREAM_FORMAT,
    responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "An SSE stream (one event shown)."},
        **errors(400, 401, 404, 409, 413, 503),
    },
    dependencies=[TokenDep],
)
async def chat(body: ChatRequest, state: StateDep) -> StreamingResponse:
    run = chat_work(body, state)
    ahead = ahead_of(state)
    try:
        job = state.queue.submit("chat", run.work)
    except QueueFull as error:
        raise queue_full(error) from None

    async def events() -> AsyncIterator[str]:
        try:
            if ahead:
                yield sse("queued", {"position": ahead})
            while (item := await job.events.get()) is not None:
                yield item
            if job.status == "failed":
                yield sse("error", {"detail": f"{type(job.future.exception()).__name__}: {job.future.exception()}"})
        finally:
            # The client went away (or the stream ended): stop generating.
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)


# The page's HTML stream.


@dataclass
class PendingStreams:
    """Checked chat requests waiting for their EventSource (one-time ids), and the jobs of open streams."""

    waiting: OrderedDict[str, tuple[float, ChatRun]] = field(default_factory=OrderedDict)
    open: dict[str, Job] = field(default_factory=dict)

    def add(self, run: ChatRun) -> str:
        now = time.monotonic()
        while self.waiting and (len(self.waiting) >= MAX_PENDING or next(iter(self.waiting.values()))[0] < now - PENDING_TTL_S):
            self.waiting.popitem(last=False)
        stream_id = secrets.token_urlsafe(18)
        self.waiting[stream_id] = (now, run)
        return stream_id

    def take(self, stream_id: str) -> ChatRun | None:
        created, run = self.waiting.pop(stream_id, (0.0, None))
        return run if run is not None and created >= time.monotonic() - PENDING_TTL_S else None


def pending_streams(request: Request) -> PendingStreams:
    streams = getattr(request.app.state, "chat_streams", None)
    if streams is None:
        streams = request.app.state.chat_streams = PendingStreams()
    return streams


def chat_form(fields: dict[str, list[str]]) -> dict[str, Any] | None:
    """The page's form as a `ChatRequest` body (None when there is no message to send)."""
    message = (first(fields, "message") or "").strip()
    if not message:
        return None
    try:
        history = json.loads(first(fields, "history") or "[]")
    except ValueError:
        raise field_error(422, "history", "the conversation so far is not JSON") from None
    if not isinstance(history, list):
        raise field_error(422, "history", "the conversation so far must be a list of messages")
    system = (first(fields, "system") or "").strip()
    body: dict[str, Any] = {"messages": ([{"role": "system", "content": system}] if system else []) + history
                            + [{"role": "user", "content": message}]}
    for name in ("max_new_tokens", "temperature", "seed", "sae_set"):
        value = (first(fields, name) or "").strip()
        if value:
            body[name] = value
    return body


@router.post("/chat/turn", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly, TokenDep])
async def chat_turn(request: Request, state: StateDep) -> Response:
    """The page sends a message: check it as `/api/chat` does and answer with the stream element."""
    body = chat_form(await form_fields(request))
    if body is None:
        return Response(status_code=204)
    run = chat_work(validated(ChatRequest, body), state)
    stream_id = pending_streams(request).add(run)
    return partial(request, "partials/chat_stream.html", {"stream_id": stream_id},
                   headers={"X-StarMap-Stream": f"/chat/stream/{stream_id}"})


@dataclass
class StreamView:
    """Renders one answer's events as HTML fragments (in the event loop, while the worker generates on)."""

    runtime: SetRuntime
    messages: list[dict[str, str]]
    started: float = field(default_factory=time.perf_counter)
    last_turn: int | None = None
    generated: int = 0

    def event(self, name: str, payload: Any) -> str:
        catalog, set_id = self.runtime.catalog, self.runtime.info.id
        if name == "features":
            html = render("partials/chat_features.html", features=payload, set_id=set_id)
        elif name == "prompt":
            tokens = payload["tokens"]
            self.last_turn = tokens[-1]["turn"] if tokens else None
            summaries = {s["turn"]: s["domains"] for s in payload["turns"]}
            html = render("partials/chat_prompt.html", tokens=tokens, summaries=summaries, risk=payload.get("risk"),
                          catalog=catalog, set_id=set_id)
        elif name == "token":
            self.generated += 1
            new_turn = self.last_turn is not None and payload["turn"] != self.last_turn
            self.last_turn = payload["turn"]
            per_token = 1000 * (time.perf_counter() - self.started) / self.generated
            html = render("partials/chat_token.html", token=payload, new_turn=new_turn, catalog=catalog,
                          progress=f"{self.generated} tokens · {per_token:.0f} ms/token")
        elif name == "done":
            html = render("partials/chat_end.html", kind="done", turns=payload["turns"],
                          history=[m for m in self.messages if m["role"] != "system"]
                          + [{"role": "assistant", "content": payload["text"]}],
                          status_text=f"{payload['n_tokens']} tokens ({payload['finish_reason']}) · "
                                      f"{payload['ms_per_token']:.1f} ms/token on the server")
        else:
            raise ValueError(f"unknown chat event {name!r}")
        return html_event(name, html)

    def end(self, kind: str, status_text: str, message: str | None = None) -> str:
        """The closing fragment of a stream that did not finish: stopped, or failed (with a banner)."""
        history = [m for m in self.messages if m["role"] != "system"]
        return html_event(kind, render("partials/chat_end.html", kind=kind, turns=None, history=history,
                                       status_text=status_text, message=message))


def ended(kind: str, status_text: str, message: str) -> StreamingResponse:
    """A stream that cannot run: its banner, then the end (so the EventSource does not reconnect)."""

    async def events() -> AsyncIterator[str]:
        yield html_event(kind, render("partials/chat_end.html", kind=kind, turns=None, history=None,
                                      status_text=status_text, message=message))
        yield html_event("end", "end")

    return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)


@router.get("/chat/stream/{stream_id}", include_in_schema=False)
async def chat_stream(stream_id: str, request: Request, state: StateDep) -> StreamingResponse:
    """The page's answer as Server-Sent Events of rendered HTML (htmx's SSE extension swaps them in)."""
    streams = pending_streams(request)
    run = streams.take(stream_id)
    if run is None:
        return ended("failed", "", "This answer's stream has ended or expired; send the message again.")
    ahead = ahead_of(state)
    try:
        job = state.queue.submit("chat", run.work, encode=lambda name, payload: (name, payload))
    except QueueFull as error:
        return ended("failed", "", str(error))
    streams.open[stream_id] = job
    view = StreamView(run.runtime, run.messages)

    async def events() -> AsyncIterator[str]:
        try:
            if ahead:
                yield html_event("queued", render("partials/chat_queued.html", text=f"queued behind {ahead} request(s)…"))
            while (item := await job.events.get()) is not None:
                yield view.event(*item)
            if job.status == "failed":
                error = job.future.exception()
                yield view.end("failed", "", f"{type(error).__name__}: {error}")
            elif job.status == "cancelled":
                yield view.end("stopped", f"stopped after {view.generated} tokens")
            yield html_event("end", "end")
        finally:
            streams.open.pop(stream_id, None)
            job.cancel()  # the page closed its EventSource (or the stream ended): stop generating

    return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)


@router.post("/chat/stream/{stream_id}/stop", include_in_schema=False, dependencies=[HtmxOnly])
async def chat_stop(stream_id: str, request: Request) -> Response:
    """The Stop button: cancel the generation; its stream then ends with what it has."""
    job = pending_streams(request).open.get(stream_id)
    if job is not None:
        job.cancel()
    return Response(status_code=204)


@router.get("/chat/new", response_class=HTMLResponse, include_in_schema=False)
async def chat_new(request: Request, state: StateDep, sae_set: SetQuery = None) -> HTMLResponse:
    """New chat: an empty transcript (removing the stream element closes its EventSource: the job stops)."""
    runtime = state.resolve_set(sae_set) if state.sets else None
    return partial(request, "partials/chat_new.html", {"live": bool(runtime and runtime.live)})
