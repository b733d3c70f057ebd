"""The steering page, `POST /api/steer` (default and steered answer, same seed) and steering presets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.exc import IntegrityError

from app import live
from app.access import TokenDep
from app.deps import (
    SessionDep,
    SetQuery,
    StateDep,
    engine_interventions,
    errors,
    field_error,
    live_set,
    page_context,
    queue_full,
    stop_condition,
    templates,
)
from app.generation import QueueFull, Sampling
from app.queries import list_presets, preset_by_name
from app.schemas import PresetIn, PresetOut, SteerOut, SteerRequest
from app.steering import MAX_INTERVENTIONS, VALUE_RANGES
from sae_engine.inference import SteeringError
from starmap.db.models import SteeringPreset

router = APIRouter()

DEFAULT_PROMPT = "How do I pick a lock?"


@router.get("/steer", response_class=HTMLResponse, include_in_schema=False)
async def steer_page(request: Request, state: StateDep, sae_set: SetQuery = None,
                     preset: str | None = Query(default=None, max_length=120),
                     prompt: str | None = Query(default=None, max_length=4000)):
    """The page; `preset` loads a preset into the panel and `prompt` fills the message (links from other pages)."""
    runtime = state.resolve_set(sae_set) if state.sets else None
    return templates.TemplateResponse(request, "steer.html", page_context(
        request, state, runtime, page="steer", value_ranges=VALUE_RANGES, max_interventions=MAX_INTERVENTIONS,
        max_new_tokens=state.options.max_new_tokens, preset=preset, prompt=prompt or DEFAULT_PROMPT,
    ))


@router.post(
    "/api/steer",
    response_model=SteerOut,
    responses=errors(400, 401, 404, 409, 413, 503),
    dependencies=[TokenDep],
    summary="Generate the default and the steered answer with the same seed",
    description="Each intervention acts once, at its own layer, as an error-preserving edit of the hooked "
    "activation along the features' decoder directions, h' = h + sum_f c_f W_dec[f], with c chosen so that the "
    "edited activation, encoded again, gives each feature its asked value a'_f (clamp: a'_f = value x normaliser; "
    "scale: a'_f = value x a_f; ablate: a'_f = 0); add: c_f = value x normaliser. `tracked` holds each steered feature's "
    "normalised activation per token in both runs.",
)
async def steer(body: SteerRequest, state: StateDep) -> dict[str, Any]:
    if body.max_new_tokens > state.options.max_new_tokens:
        raise field_error(422, "max_new_tokens", f"at most {state.options.max_new_tokens} on this server")
    model, runtime = live_set(state, body.sae_set)
    interventions = engine_interventions(runtime, body.interventions)
    prompt = live.encode_prompt(model, [m.model_dump() for m in body.messages])
    if len(prompt.ids) > state.options.max_prompt_tokens:
        raise field_error(422, "messages", f"the prompt is {len(prompt.ids)} tokens; at most {state.options.max_prompt_tokens}")
    sampling = Sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed)
    stop_when = stop_condition(runtime, body.stop_when)
    job = live.steer_job(model, runtime, prompt, sampling, interventions, body.top_n, stop_when, body.cost)
    try:
        runs = await state.queue.run("steer", job)
    except QueueFull as error:
        raise queue_full(error) from None
    except SteeringError as error:
        raise field_error(422, "interventions", str(error)) from None
    referenced = {fid for run in (runs["default"], runs["steered"]) for part in ("prompt", "response") for token in run[part]
                  for fid, _ in token["top"]} | {i.feature for i in body.interventions if i.feature}
    features = {fid: runtime.catalog[fid].public() for fid in sorted(referenced) if fid in runtime.catalog}
    return {"sae_set": runtime.info.id, "seed": body.seed, "interventions": body.interventions, **runs,
            "features": features}


def _preset_out(preset: SteeringPreset) -> dict[str, Any]:
    return {"name": preset.name, "sae_set": preset.sae_set_id, "interventions": preset.interventions,
            "description": preset.description, "figures": preset.figures, "example": preset.example}


@router.get("/api/presets", response_model=list[PresetOut], response_model_exclude_none=True, responses=errors(404), summary="Saved steering presets")
async def presets(db: SessionDep, state: StateDep, sae_set: SetQuery = None) -> list[dict]:
    set_id = state.resolve_set(sae_set).info.id if sae_set else None
    return [_preset_out(p) for p in list_presets(db, set_id)]


@router.post("/api/presets", response_model=PresetOut, response_model_exclude_none=True, status_code=201, dependencies=[TokenDep],
             responses={200: {"model": PresetOut, "description": "An existing preset of that name was replaced."},
                        **errors(400, 401, 404, 409, 413, 503)},
             summary="Save a steering preset (an existing name is replaced)")
async def save_preset(body: PresetIn, db: SessionDep, state: StateDep, response: Response) -> dict[str, Any]:
    runtime = state.resolve_set(body.sae_set)
    for i, item in enumerate(body.interventions):
        if item.hooked_layer not in runtime.info.layers or item.index >= runtime.info.d_sae:
            field = "feature" if item.feature is not None else "layer"
            raise field_error(422, f"interventions.{i}.{field}", f"{item.key} is not in set {runtime.info.name!r}")
    stored = [item.model_dump(exclude_none=True) for item in body.interventions]
    preset = preset_by_name(db, body.name)
    if preset is None:
        preset = SteeringPreset(name=body.name, sae_set_id=runtime.info.id, interventions=stored)
        db.add(preset)
    else:
        preset.sae_set_id, preset.interventions = runtime.info.id, stored
        response.status_code = 200
    try:
        db.commit()
    except IntegrityError as error:
        db.rollback()
        raise field_error(409, "name", f"preset {body.name!r} could not be saved: {error.orig}") from None
    return _preset_out(preset)


@router.get("/api/presets/{name}", response_model=PresetOut, response_model_exclude_none=True, responses=errors(404), summary="One steering preset")
async def get_preset(name: str, db: SessionDep) -> dict[str, Any]:
    preset = preset_by_name(db, name)
    if preset is None:
        raise HTTPException(404, detail=[{"loc": ["path", "name"], "msg": f"no preset {name!r}", "type": "not_found"}])
    return _preset_out(preset)


@router.delete("/api/presets/{name}", status_code=204, responses=errors(401, 404, 503), dependencies=[TokenDep],
               summary="Delete a steering preset")
async def delete_preset(name: str, db: SessionDep) -> Response:
    preset = preset_by_name(db, name)
    if preset is None:
        raise HTTPException(404, detail=[{"loc": ["path", "name"], "msg": f"no preset {name!r}", "type": "not_found"}])
    db.delete(preset)
    db.commit()
    return Response(status_code=204)
