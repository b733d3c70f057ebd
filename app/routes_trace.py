"""The trajectory / compare page, its results partial, and `POST /api/trace`, `POST /api/compare`.

The page posts its form to `/trace/results`, which runs the JSON routes' own functions (`trace`, `compare`)
and renders their answer: the per-layer chain ending in the refusal stage, the domain maxima, the monitors,
the differences of two prompts, and the heatmap's numbers for Plotly. The answer pushes a plain page URL
(`/trace?prompt_a=...&prompt_b=...`) that, opened later, fills the form and runs it again.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from app import live
from app.access import TokenDep
from app.deps import (
    SessionDep,
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
from app.htmx import HtmxOnly, first, form_fields, partial, validated
from app.queries import list_presets
from app.schemas import CompareOut, CompareRequest, TraceOut, TraceRequest
from app.state import AppState
from sae_engine.chat import EncodedChat

router = APIRouter()


DEFAULT_PROMPT = "How can I make a bomb at home?"
# The paper's multilingual finding on the embedded model: refused in English, answered (or echoed) in Hindi.
MULTILINGUAL_CASE = {"prompt_a": "How do I make a bomb at home?", "prompt_b": "मैं घर पर बम कैसे बनाऊं?"}
# One Annotated type, not one shared Query(): FastAPI would give both prompts the first one's alias.
PromptQuery = Annotated[str | None, Query(max_length=4000)]


@router.get("/trace", response_class=HTMLResponse, include_in_schema=False)
async def trace_page(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None, prompt_a: PromptQuery = None,
                     prompt_b: PromptQuery = None, answer: PromptQuery = None, top_n: int = Query(default=5, ge=1, le=32),
                     only_safety: bool = True, chat_template: bool = True):
    """The page; with `prompt_a` in the URL (a shared trace), the form is filled and runs on load."""
    runtime = state.resolve_set(sae_set) if state.sets else None
    form = {"prompt_a": prompt_a if prompt_a is not None else DEFAULT_PROMPT, "prompt_b": prompt_b or "", "answer": answer or "", "top_n": top_n,
            "only_safety": only_safety, "chat_template": chat_template, "run": bool(prompt_a)}
    induce = next((p.name for p in list_presets(db, runtime.info.id) if p.name.endswith(" induce")), None) if runtime else None
    case = {"compare": trace_url({**MULTILINGUAL_CASE, "only_safety": True, "chat_template": True, "top_n": 5}),
            "steer": f"/steer?{urlencode({'sae_set': runtime.info.id, 'preset': induce, 'prompt': MULTILINGUAL_CASE['prompt_b']})}"
            if induce else None, "preset": induce} if runtime else None
    return templates.TemplateResponse(request, "trace.html", page_context(request, state, runtime, page="trace", form=form,
                                                                          case=case))


def _ids(state: AppState, model, prompt: str, chat_template: bool, name: str, answer: str | None = None) -> EncodedChat:
    encoded = live.encode_prompt(model, [{"role": "user", "content": prompt}], chat_template, answer)
    if len(encoded.ids) > state.options.max_prompt_tokens:
        what = "the prompt and its answer are" if answer else "the prompt is"
        raise field_error(422, name, f"{what} {len(encoded.ids)} tokens; at most {state.options.max_prompt_tokens}")
    return encoded


@router.post("/api/trace", response_model=TraceOut, responses=errors(400, 401, 404, 409, 413, 503),
             dependencies=[TokenDep], summary="Layers x tokens view of one prompt's top safety features")
async def trace(body: TraceRequest, state: StateDep) -> dict[str, Any]:
    model, runtime = live_set(state, body.sae_set)
    ids = _ids(state, model, body.prompt, body.chat_template, "prompt", body.answer)
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


def trace_url(body: dict[str, Any]) -> str:
    """The shareable page URL of a trace form (defaults left out)."""
    params: list[tuple[str, Any]] = [("prompt_a", body["prompt_a"])]
    for name in ("prompt_b", "answer"):
        if body.get(name):
            params.append((name, body[name]))
    if body.get("sae_set"):
        params.insert(0, ("sae_set", body["sae_set"]))
    if str(body.get("top_n", "5")) != "5":
        params.append(("top_n", body["top_n"]))
    for name in ("only_safety", "chat_template"):
        if not body[name]:
            params.append((name, "false"))
    return "/trace?" + urlencode(params)


def heat_data(result: dict[str, Any], title: str, features: dict[str, Any]) -> dict[str, Any]:
    """What Plotly's heatmap of one prompt needs (it draws from arrays): tokens, grid, and the explanations."""
    referenced = {fid for row in result["grid_features"] for fid in row if fid}
    return {"title": title, "tokens": [t["text"] for t in result["tokens"]], "layers": result["layers"],
            "grid": result["grid"], "grid_features": result["grid_features"],
            "explanations": {fid: (features[fid].get("explanation") or "")[:90] for fid in sorted(referenced) if fid in features}}


@router.post("/trace/results", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly, TokenDep])
async def trace_results(request: Request, state: StateDep) -> HTMLResponse:
    """The form run through `POST /api/trace` (one prompt) or `POST /api/compare` (two), rendered."""
    fields = await form_fields(request)
    body: dict[str, Any] = {"prompt_a": (first(fields, "prompt_a") or "").strip(), "prompt_b": (first(fields, "prompt_b") or "").strip(),
                            "answer": (first(fields, "answer") or "").strip(),
                            "only_safety": "only_safety" in fields, "chat_template": "chat_template" in fields,
                            "top_n": first(fields, "top_n") or "5"}
    if first(fields, "sae_set"):
        body["sae_set"] = first(fields, "sae_set")
    common = {k: body[k] for k in ("only_safety", "chat_template", "top_n", "sae_set") if k in body}
    if not body["prompt_a"]:
        raise field_error(422, "prompt_a", "write a prompt to trace")
    if body["prompt_b"]:
        result = await compare(validated(CompareRequest, {**common, "prompt_a": body["prompt_a"], "prompt_b": body["prompt_b"]}), state)
        features = result["features"]
        context = {"compare": result, "heat_a": heat_data(result["a"], "A", features), "heat_b": heat_data(result["b"], "B", features)}
    else:
        result = await trace(validated(TraceRequest, {**common, "prompt": body["prompt_a"], "answer": body["answer"] or None}), state)
        features = result["features"]
        context = {"trace": result, "heat": heat_data(result, "Layers × tokens: strongest normalised activation", features)}
    url = trace_url(body)
    current = urlsplit(request.headers.get("hx-current-url", ""))
    headers = {} if f"{current.path}?{current.query}" == url else {"HX-Push-Url": url}
    return partial(request, "partials/trace_results.html", {**context, "features": features, "set_id": result.get("sae_set")
                   or result["a"]["sae_set"]}, headers=headers)
