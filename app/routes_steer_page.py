"""The steering page's partials: the steering panel, the add-a-feature search, presets, and the results.

The JSON routes stay in `app/routes_steer.py`; every partial here that reads or writes what they serve calls
those very functions (`steer`, `presets`, `save_preset`, `get_preset`, `delete_preset`) and renders their
answer, so the page and the API cannot drift. The results are rendered from the `/api/steer` answer as it
comes: the two runs and the tracked features by name, any other field of the answer (or of a run) in a
generic table, so a new figure of the API shows on the page without a template change.

The panel's interventions are kept per SAE set in a cookie (`starmap_steer_<set id>`, written by the server):
a "+ steer" button on any page adds to it, the steering page renders it, a preset loads into it. The form
fields are named `interventions.<n>.<field>` (`when.feature` for a nested field), as the API's JSON body.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse

from app import routes_steer
from app.access import TokenDep
from app.deps import SessionDep, SetQuery, StateDep, field_error
from app.htmx import HtmxOnly, first, form_fields, partial, validated, with_toast
from app.routes_features import list_features
from app.schemas import PresetIn, SteerRequest
from app.state import SetRuntime
from app.steering import FEATURE_ID, MAX_INTERVENTIONS, VALUE_RANGES, InterventionIn
from sae_engine.inference import DIRECTION_MODES

router = APIRouter()

COOKIE = "starmap_steer_{}"
COOKIE_AGE_S = 365 * 24 * 3600
FIELD = re.compile(r"^interventions\.(\d{1,2})\.([a-z_]+(?:\.[a-z_]+)?)$")
NUMBERS = ("value", "above", "layer")
# The value a mode starts at when chosen (then kept within its range).
START = {"clamp": 4.0, "scale": 2.0, "add": 4.0, "direction_add": 1.0}
N_SUGGESTED = 3  # features suggested per sign of the cosine with the refusal direction
RUN_FIELDS = {"text", "finish_reason", "prompt", "response", "tracked", "tracked_units"}
ANSWER_FIELDS = {"sae_set", "seed", "interventions", "default", "steered", "features", "cost"}
SEARCH_LISTED = 15


# The panel's store.


def key_of(item: dict[str, Any]) -> str:
    """An intervention's name: its feature id, or `<layer>_direction` for a layer's refusal direction."""
    return item.get("feature") or f"{item.get('layer')}_direction"


def modes_for(item: dict[str, Any]) -> list[str]:
    direction = not item.get("feature")
    return [m for m in VALUE_RANGES if (m in DIRECTION_MODES) == direction]


def tidy(item: dict[str, Any], before: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An intervention as the panel keeps it: a known mode, its value within the mode's range (a mode just
    chosen starts at its usual value), a known scope; None for something that is no intervention."""
    feature, layer = item.get("feature"), item.get("layer")
    if feature is not None and not FEATURE_ID.match(str(feature)):
        return None
    out: dict[str, Any] = {"feature": str(feature)} if feature else {}
    if not feature:
        try:
            out["layer"] = int(layer)
        except (TypeError, ValueError):
            return None
    modes = modes_for({**out, "mode": item.get("mode")})
    mode = item.get("mode") if item.get("mode") in modes else (modes[0] if modes else "clamp")
    low, high = VALUE_RANGES.get(mode, (0.0, 0.0))
    try:
        value = float(item.get("value", START.get(mode, 0.0)))
    except (TypeError, ValueError):
        value = START.get(mode, 0.0)
    if before is not None and before.get("mode") != mode:
        value = START.get(mode, (low + high) / 2)
    out.update(mode=mode, value=min(high, max(low, value)), scope=item.get("scope") if item.get("scope") in ("prompt", "response", "both") else "both")
    when = item.get("when")
    if isinstance(when, dict) and when.get("feature") and FEATURE_ID.match(str(when["feature"])):
        try:
            out["when"] = {"feature": str(when["feature"]), "above": max(0.0, float(when.get("above") or 0.0))}
        except ValueError:
            pass
    return out


def stored(request: Request, set_id: int) -> list[dict[str, Any]]:
    raw = request.cookies.get(COOKIE.format(set_id))
    try:
        items = json.loads(unquote(raw)) if raw else []
    except ValueError:
        return []
    return [item for item in (tidy(i) for i in items if isinstance(i, dict)) if item][:MAX_INTERVENTIONS] if isinstance(items, list) else []


def keep(response: Response, set_id: int, items: list[dict[str, Any]]) -> None:
    response.set_cookie(COOKIE.format(set_id), quote(json.dumps(items, separators=(",", ":"))), max_age=COOKIE_AGE_S,
                        path="/", samesite="lax", httponly=True)


def form_interventions(fields: dict[str, list[str]]) -> list[dict[str, Any]]:
    """`interventions.<n>.<field>` form fields as the API's list of intervention objects (in row order)."""
    rows: dict[int, dict[str, Any]] = defaultdict(dict)
    for name, values in fields.items():
        match = FIELD.match(name)
        if not match or not values:
            continue
        row, path = rows[int(match.group(1))], match.group(2).split(".")
        for part in path[:-1]:
            row = row.setdefault(part, {})
        row[path[-1]] = values[-1]
    out = []
    for _, row in sorted(rows.items()):
        when = row.get("when")
        if isinstance(when, dict) and not (when.get("feature") or "").strip():
            row.pop("when")
        out.append(row)
    return out


def api_interventions(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The panel's rows as the API's body wants them (fields the API does not know are left out)."""
    known = set(InterventionIn.model_fields)
    return [{k: v for k, v in item.items() if k in known and v not in (None, "")} for item in items]


# Rendering.


def panel_context(runtime: SetRuntime, items: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for item in items:
        meta = runtime.catalog.get(item["feature"]) if item.get("feature") else None
        low, high = VALUE_RANGES.get(item["mode"], (0.0, 0.0))
        rows.append({**item, "key": key_of(item), "meta": meta, "modes": modes_for(item), "low": low, "high": high,
                     "fixed": low == high, "step": 0.1 if item["mode"] == "scale" else 0.25})
    directions = sorted(runtime.directions)
    return {"rows": rows, "set_id": runtime.info.id, "directions": directions, "max_interventions": MAX_INTERVENTIONS,
            "suggestions": runtime.refusal_suggestions(N_SUGGESTED) if runtime.live else []}


def panel(request: Request, runtime: SetRuntime, items: list[dict[str, Any]], message: str | None = None) -> HTMLResponse:
    response = partial(request, "partials/steer_panel.html", panel_context(runtime, items))
    keep(response, runtime.info.id, items)
    return with_toast(response, message) if message else response


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def results_context(answer: dict[str, Any], runtime: SetRuntime) -> dict[str, Any]:
    """The `/api/steer` answer as the results partial shows it."""
    answer = jsonable_encoder(answer)
    tracked = []
    for item in answer["interventions"]:
        key = key_of(item)
        row = {"key": key, "item": item}
        for run in ("default", "steered"):
            series = answer[run].get("tracked", {}).get(key)
            if series is not None:
                response = series[len(answer[run]["prompt"]):]
                row[run] = (mean(response), max([0.0, *response]))
        row["units"] = answer["steered"].get("tracked_units", {}).get(key)
        tracked.append(row)
    extra = {k: v for k, v in answer.items() if k not in ANSWER_FIELDS}
    run_extra = {run: {k: v for k, v in answer[run].items() if k not in RUN_FIELDS} for run in ("default", "steered")}
    return {"answer": answer, "tracked": tracked, "extra": extra, "run_extra": run_extra, "catalog": runtime.catalog,
            "features": answer.get("features", {}), "set_id": runtime.info.id}


def presets_context(items: list[dict[str, Any]], selected: str | None, set_id: int) -> dict[str, Any]:
    return {"presets": jsonable_encoder(items), "selected": selected, "set_id": set_id}


# Routes.


@router.get("/steer/panel", response_class=HTMLResponse, include_in_schema=False)
async def steer_panel(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None,
                      preset: str | None = Query(default=None, max_length=120)) -> HTMLResponse:
    """The panel as kept in the set's cookie, or with `preset` (a link such as `/steer?preset=...`) that preset."""
    runtime = state.resolve_set(sae_set)
    if preset:
        found = jsonable_encoder(await routes_steer.get_preset(name=preset, db=db))
        return panel(request, runtime, [item for item in (tidy(i) for i in found["interventions"]) if item],
                     f"preset “{preset}” loaded")
    return panel(request, runtime, stored(request, runtime.info.id))


@router.post("/steer/panel", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly])
async def steer_panel_save(request: Request, state: StateDep, sae_set: SetQuery = None) -> HTMLResponse:
    """A control of the panel changed: keep the rows as the form has them (a new mode starts at its value)."""
    runtime = state.resolve_set(sae_set)
    before = {key_of(item): item for item in stored(request, runtime.info.id)}
    rows = [tidy(row, before.get(key_of(row))) for row in form_interventions(await form_fields(request))]
    return panel(request, runtime, [row for row in rows if row][:MAX_INTERVENTIONS])


@router.post("/steer/panel/add", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly])
async def steer_panel_add(request: Request, state: StateDep, sae_set: SetQuery = None) -> HTMLResponse:
    """"+ steer" anywhere: add a feature (or a layer's refusal direction) to the set's panel."""
    runtime = state.resolve_set(sae_set)
    fields = await form_fields(request)
    feature, layer = first(fields, "feature"), first(fields, "layer")
    if feature:
        if not FEATURE_ID.match(feature) or int(feature.split("_")[0]) not in runtime.info.layers:
            raise field_error(422, "feature", f"{feature!r} is not a feature of set {runtime.info.name!r}")
        item = tidy({"feature": feature, "mode": "clamp", "value": START["clamp"]})
    elif layer:
        item = tidy({"layer": layer, "mode": DIRECTION_MODES[0]})
    else:
        raise field_error(422, "feature", "name a feature to add")
    items = stored(request, runtime.info.id)
    if item is None:
        raise field_error(422, "feature", "not an intervention")
    key = key_of(item)
    if any(key_of(i) == key for i in items):
        message = f"{key} is already in the steering panel"
    elif len(items) >= MAX_INTERVENTIONS:
        message = f"the steering panel holds at most {MAX_INTERVENTIONS} interventions"
    else:
        items.append(item)
        message = f"{key} added to the steering panel"
    on_steer_page = urlsplit(request.headers.get("hx-current-url", "")).path == "/steer"
    if on_steer_page:  # the panel is on this page: show it (out of band), and clear the search that added it
        response = partial(request, "partials/steer_added.html", {**panel_context(runtime, items), "oob": True})
    else:
        response = HTMLResponse("")
    keep(response, runtime.info.id, items)
    return with_toast(response, message)


@router.post("/steer/panel/remove", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly])
async def steer_panel_remove(request: Request, state: StateDep, sae_set: SetQuery = None,
                             key: str = Query(max_length=64)) -> HTMLResponse:
    runtime = state.resolve_set(sae_set)
    rows = [tidy(row) for row in form_interventions(await form_fields(request))]
    return panel(request, runtime, [row for row in rows if row and key_of(row) != key])


@router.post("/steer/panel/clear", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly])
async def steer_panel_clear(request: Request, state: StateDep, sae_set: SetQuery = None) -> HTMLResponse:
    return panel(request, state.resolve_set(sae_set), [])


@router.get("/steer/search", response_class=HTMLResponse, include_in_schema=False)
async def steer_search(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None,
                       q: str | None = Query(default=None, max_length=200)) -> HTMLResponse:
    """Add a feature: by id, or from the listing of `GET /api/features?q=...`."""
    runtime = state.resolve_set(sae_set)
    query = (q or "").strip()
    by_id = query if FEATURE_ID.match(query) else None
    items = [] if by_id or not query else list_features(runtime, db, query, limit=SEARCH_LISTED)["items"]
    return partial(request, "partials/steer_search.html", {"q": query, "by_id": by_id, "items": items, "set_id": runtime.info.id})


@router.get("/steer/presets", response_class=HTMLResponse, include_in_schema=False)
async def steer_presets(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None,
                        selected: str | None = Query(default=None, max_length=120)) -> HTMLResponse:
    runtime = state.resolve_set(sae_set)
    items = await routes_steer.presets(db=db, state=state, sae_set=str(runtime.info.id))
    return partial(request, "partials/steer_presets.html", presets_context(items, selected, runtime.info.id))


@router.post("/steer/presets/save", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly, TokenDep])
async def steer_preset_save(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None) -> HTMLResponse:
    """Save the panel as a preset through `POST /api/presets`."""
    runtime = state.resolve_set(sae_set)
    fields = await form_fields(request)
    name = (first(fields, "name") or "").strip()
    if not name:
        raise field_error(422, "name", "name the preset first")
    interventions = api_interventions(form_interventions(fields))
    if not interventions:
        raise field_error(422, "interventions", "the steering panel is empty: add a feature first")
    body = validated(PresetIn, {"name": name, "sae_set": str(runtime.info.id), "interventions": interventions})
    await routes_steer.save_preset(body=body, db=db, state=state, response=Response())
    items = await routes_steer.presets(db=db, state=state, sae_set=str(runtime.info.id))
    response = partial(request, "partials/steer_presets.html", presets_context(items, name, runtime.info.id))
    return with_toast(response, f"preset “{name}” saved")


@router.post("/steer/presets/load", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly])
async def steer_preset_load(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None) -> HTMLResponse:
    """Load a preset (`GET /api/presets/{name}`) into the panel."""
    runtime = state.resolve_set(sae_set)
    name = (first(await form_fields(request), "name") or "").strip()
    if not name:
        raise field_error(422, "name", "choose a preset to load")
    preset = jsonable_encoder(await routes_steer.get_preset(name=name, db=db))
    items = [item for item in (tidy(i) for i in preset["interventions"]) if item]
    return panel(request, runtime, items, f"preset “{name}” loaded")


@router.post("/steer/presets/delete", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly, TokenDep])
async def steer_preset_delete(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None) -> HTMLResponse:
    """Delete a preset through `DELETE /api/presets/{name}`."""
    runtime = state.resolve_set(sae_set)
    name = (first(await form_fields(request), "name") or "").strip()
    if not name:
        raise field_error(422, "name", "choose a preset to delete")
    await routes_steer.delete_preset(name=name, db=db)
    items = await routes_steer.presets(db=db, state=state, sae_set=str(runtime.info.id))
    response = partial(request, "partials/steer_presets.html", presets_context(items, None, runtime.info.id))
    return with_toast(response, f"preset “{name}” deleted")


@router.post("/steer/run", response_class=HTMLResponse, include_in_schema=False, dependencies=[HtmxOnly, TokenDep])
async def steer_run(request: Request, state: StateDep, sae_set: SetQuery = None) -> HTMLResponse:
    """Generate the default and the steered answer through `POST /api/steer`, side by side."""
    runtime = state.resolve_set(sae_set)
    fields = await form_fields(request)
    interventions = api_interventions(form_interventions(fields))
    if not interventions:
        raise field_error(422, "interventions", "add at least one feature to the steering panel")
    body: dict[str, Any] = {"messages": [{"role": "user", "content": first(fields, "prompt") or ""}],
                            "interventions": interventions, "sae_set": str(runtime.info.id)}
    for name in ("max_new_tokens", "temperature", "seed"):
        if (value := (first(fields, name) or "").strip()):
            body[name] = value
    answer = await routes_steer.steer(body=validated(SteerRequest, body), state=state)
    return partial(request, "partials/steer_results.html", results_context(answer, runtime))
