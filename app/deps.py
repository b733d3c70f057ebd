"""Dependencies and request checks shared by the routers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.access import exposed
from app.generation import QueueFull
from app.live import SteeringPlan
from app.schemas import MAX_NAME, ErrorOut
from app.state import AppState, SetRuntime, get_state
from app.steering import FEATURE_ID, ConditionIn, InterventionIn
from sae_engine.inference import Condition, Intervention, PositionClock, SteeringError, steering_edits
from sae_engine.models import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
templates = Jinja2Templates(directory=ROOT / "templates")

DOMAIN_COLOURS = {
    "politics": "#7b61ff",
    "pornography": "#e0529c",
    "violence": "#e8590c",
    "terror": "#c92a2a",
    "self_harm": "#f59f00",
    "drugs": "#0ca678",
    "hate": "#1c7ed6",
    "refusal": "#343a40",
}


def field_error(status: int, name: str, message: str, where: str = "body", **headers: str) -> HTTPException:
    """An error in FastAPI's validation shape, naming the offending field."""
    return HTTPException(status, detail=[{"loc": [where, name], "msg": message, "type": "value_error"}],
                         headers=headers or None)


StateDep = Annotated[AppState, Depends(get_state)]
SetQuery = Annotated[str | None, Query(max_length=MAX_NAME, description="SAE set id or name; default: the live set.")]

ERRORS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The request body could not be decoded."},
    413: {"model": ErrorOut, "description": "The request body is larger than 4 MiB."},
    401: {"model": ErrorOut, "description": "The server is bound beyond loopback and the request lacks "
                                            "`Authorization: Bearer <STARMAP_API_TOKEN>`."},
    404: {"model": ErrorOut, "description": "No such SAE set, feature or preset; `detail[].loc` names it."},
    409: {"model": ErrorOut, "description": "The SAE set cannot run live (model not loaded, checkpoints missing or "
                                            "refused), or the write conflicts; `detail[].loc` names the field."},
    503: {"model": ErrorOut, "description": "Busy: the generation queue is full, or (on writes) another process "
                                            "holds the database's write lock; retry after `Retry-After` seconds.",
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer (422 is documented by FastAPI)."""
    return {code: ERRORS[code] for code in sorted(codes)}


def session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as db:
        yield db


SessionDep = Annotated[Session, Depends(session)]


def live_set(state: AppState, ref: str | None) -> tuple[LoadedModel, SetRuntime]:
    """The set `ref` with its SAEs loaded on the running model; 409 naming `sae_set` if it cannot run live."""
    runtime = state.resolve_set(ref)
    if runtime.bundle is None or state.model is None:
        raise field_error(409, "sae_set", runtime.live_error or "this set cannot run live")
    return state.model, runtime


def queue_full(error: QueueFull) -> HTTPException:
    return HTTPException(503, detail=str(error), headers={"Retry-After": str(error.retry_after)})


def parse_feature_id(value: str, where: str = "path", name: str = "feature_id") -> tuple[int, int]:
    match = FEATURE_ID.match(value)
    if not match:
        raise field_error(422, name, f"{value!r} is not a feature id; expected \"{{layer}}_{{index}}\"", where)
    return int(match.group(1)), int(match.group(2))


def engine_interventions(runtime: SetRuntime, items: list[InterventionIn]) -> list[Intervention]:
    """Check each intervention against the set (layer hooked, index in range, normaliser known, refusal
    direction recorded, condition feature usable); the 422 names the field."""
    out = []
    layers = list(runtime.info.layers)
    for i, item in enumerate(items):
        if item.feature is None:
            name = f"interventions.{i}.layer"
            if item.layer not in layers:
                raise field_error(422, name, f"layer {item.layer} is not hooked; layers: {layers}")
            if item.layer not in runtime.directions:
                raise field_error(422, name, f"layer {item.layer} has no refusal direction in the database "
                                             f"(layers with one: {sorted(runtime.directions)})")
        else:
            _check_feature(runtime, item.feature, f"interventions.{i}.feature", needs_normaliser=item.mode in ("clamp", "add"),
                           mode=item.mode)
        if item.when is not None:
            _check_feature(runtime, item.when.feature, f"interventions.{i}.when.feature", needs_normaliser=True, mode="when")
        out.append(item.engine())
    return out


def stop_condition(runtime: SetRuntime, condition: ConditionIn | None) -> Condition | None:
    """The engine's `stop_when` condition, checked against the set (422 naming `stop_when.feature`)."""
    if condition is None:
        return None
    _check_feature(runtime, condition.feature, "stop_when.feature", needs_normaliser=True, mode="stop_when")
    return condition.engine()


def steering_plan(state: AppState, items: list[InterventionIn], stop_when: ConditionIn | None) -> SteeringPlan:
    """The `/v1` extension fields checked against the live set, as the plan its token loop applies."""
    _, runtime = live_set(state, None)
    assert runtime.bundle is not None
    interventions = engine_interventions(runtime, items)
    try:
        steering_edits(runtime.bundle, interventions, PositionClock(), runtime.directions)
    except SteeringError as error:
        raise field_error(422, "interventions", str(error)) from None
    return SteeringPlan(runtime.bundle, tuple(interventions), runtime.directions, stop_condition(runtime, stop_when))


def _check_feature(runtime: SetRuntime, feature: str, name: str, needs_normaliser: bool, mode: str) -> None:
    layer, index = map(int, feature.split("_"))
    if layer not in runtime.info.layers:
        raise field_error(422, name, f"layer {layer} of {feature} is not hooked; layers: {list(runtime.info.layers)}")
    if index >= runtime.info.d_sae:
        raise field_error(422, name, f"index {index} of {feature} is out of range 0..{runtime.info.d_sae - 1}")
    meta = runtime.catalog.get(feature)
    if needs_normaliser and (meta is None or not meta.normaliser):
        raise field_error(422, name, f"{feature} has no normaliser in the database, so {mode} (in normalised units) is "
                                     "undefined; use scale or ablate")


def page_context(request: Request, state: AppState, runtime: SetRuntime | None, **extra: Any) -> dict[str, Any]:
    return {
        "request": request,
        "sets": [s.describe() for s in state.sets.values()],
        "current_set": runtime.describe() if runtime else None,
        "model_name": state.model.name if state.model else None,
        "model_error": state.model_error,
        "domain_colours": DOMAIN_COLOURS,
        "auth_required": exposed(state.settings),
        **extra,
    }
