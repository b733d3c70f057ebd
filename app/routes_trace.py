"""The trajectory / compare page and `POST /api/trace`, `POST /api/compare`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

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
from app.generation import QueueFull
from app.schemas import CompareOut, CompareRequest, TraceOut, TraceRequest
from app.state import AppState
from sae_engine.chat import EncodedChat

router = APIRouter()


@router.get("/trace", response_class=HTMLResponse, include_in_schema=False)
async def trace_page(request: Request, state: StateDep, sae_set: SetQuery = None):
    runtime = state.resolve_set(sae_set) if state.sets else None
    return templates.TemplateResponse(request, "trace.html", page_context(request, state, runtime, page="trace"))


def _ids(state: AppState, model, prompt: str, chat_template: bool, name: str) -> EncodedChat:
    encoded = live.encode_prompt(model, [{"role": "user", "content": prompt}], chat_template)
    if len(encoded.ids) > state.options.max_prompt_tokens:
        raise field_error(422, name, f"the prompt is {len(encoded.ids)} tokens; at most {state.options.max_prompt_tokens}")
    return encoded


@router.post("/api/trace", response_model=TraceOut, responses=errors(400, 401, 404, 409, 413, 503),
             dependencies=[TokenDep], summary="Layers x tokens view of one prompt's top safety features")
async def trace(body: TraceRequest, state: StateDep) -> dict[str, Any]:
    model, runtime = live_set(state, body.sae_set)
    ids = _ids(state, model, body.prompt, body.chat_template, "prompt")
    try:
        return await state.queue.run("trace", live.trace_job(model, runtime, ids, body.only_safety, body.top_n))
    except QueueFull as error:
        raise queue_full(error) from None


@router.post("/api/compare", response_model=CompareOut, responses=errors(400, 401, 404, 409, 413, 503),
             dependencies=[TokenDep], summary="Two prompts side by side with per-feature differences")
async def compare(body: CompareRequest, state: StateDep) -> dict[str, Any]:
    model, runtime = live_set(state, body.sae_set)
    ids_a = _ids(state, model, body.prompt_a, body.chat_template, "prompt_a")
    ids_b = _ids(state, model, body.prompt_b, body.chat_template, "prompt_b")
    work = live.compare_job(model, runtime, ids_a, ids_b, body.only_safety, body.top_n, body.n_differences)
    try:
        return await state.queue.run("compare", work)
    except QueueFull as error:
        raise queue_full(error) from None
