"""The neuron map page and `GET /api/map` (columnar JSON, serialised once per set at start-up)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import SetQuery, StateDep, errors, field_error, page_context, templates
from app.schemas import MapOut

router = APIRouter()


@router.get("/map", response_class=HTMLResponse, include_in_schema=False)
async def map_page(request: Request, state: StateDep, sae_set: SetQuery = None):
    runtime = state.resolve_set(sae_set) if state.sets else None
    return templates.TemplateResponse(request, "map.html", page_context(request, state, runtime, page="map"))


@router.get(
    "/api/map",
    response_model=MapOut,
    responses=errors(404),
    summary="Every explained feature with its map coordinates",
    description="Columns of equal length (one entry per feature). Filters are optional; without them the "
    "answer is served from a cache built at start-up.",
)
async def map_json(
    state: StateDep,
    sae_set: SetQuery = None,
    domain: str | None = Query(default=None, max_length=64),
    layer: int | None = Query(default=None, ge=0, le=1000),
    min_score: float | None = Query(default=None, ge=-1.0, le=1.0),
) -> Response:
    runtime = state.resolve_set(sae_set)
    if layer is not None and layer not in runtime.info.layers:
        raise field_error(422, "layer", f"layer {layer} is not in set {runtime.info.name!r} (layers {list(runtime.info.layers)})", "query")
    return Response(runtime.map.filtered(domain, layer, min_score), media_type="application/json")
