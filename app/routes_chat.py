"""The chat page and its streamed JSON twin, `POST /api/chat` (Server-Sent Events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
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
    templates,
)
from app.generation import QueueFull, Sampling, sse
from app.schemas import ChatRequest

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
    prompt = live.encode_prompt(model, [m.model_dump() for m in body.messages])
    if len(prompt.ids) > options.max_prompt_tokens:
        raise field_error(422, "messages", f"the prompt is {len(prompt.ids)} tokens; at most {options.max_prompt_tokens}")
    sampling = Sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed)
    ahead = state.queue.waiting + (1 if state.queue.running else 0)
    try:
        job = state.queue.submit("chat", live.chat_job(model, runtime, prompt, sampling, body.domains, body.top_n))
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

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
