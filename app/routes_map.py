"""The neuron map page, its partials (search results, the filtered view), and `GET /api/map` (columnar JSON,
serialised once per set at start-up).

The page's state is its URL: `/map?q=weapons&hide_domain=violence&hide_layer=2&min_score=0.3&highlight=chat`
renders the search results and the filters as they were. Typing in the search box asks `/map/search` (the
listing of `GET /api/features`), a filter change asks `/map/view` (which features are shown, from the map's
own columns); both answer with the canonical page URL in `HX-Push-Url`. Plotly draws the points from
`/api/map` and the shown rows the view partial names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode
from weakref import WeakKeyDictionary

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import SessionDep, SetQuery, StateDep, errors, field_error, page_context, templates
from app.htmx import partial
from app.render import OTHER
from app.routes_features import list_features
from app.schemas import MapOut
from app.state import MapData, SetRuntime

router = APIRouter()

SEARCH_HITS = 200  # search hits marked on the map
SEARCH_LISTED = 40  # of which listed beside it

Text = Annotated[str | None, Query(max_length=200)]
Names = Annotated[list[str] | None, Query(max_length=64)]
Layers = Annotated[list[int] | None, Query(max_length=64)]
Score = Annotated[float | None, Query(ge=0.0, le=1.0)]
Short = Annotated[str | None, Query(max_length=16)]


@dataclass(frozen=True)
class MapFilters:
    """What the page hides: domains (`other`: explained features without one), layers, and scores below a minimum."""

    hidden_domains: frozenset[str] = frozenset()
    hidden_layers: frozenset[int] = frozenset()
    min_score: float = 0.0

    @property
    def default(self) -> bool:
        return not self.hidden_domains and not self.hidden_layers and self.min_score <= 0


class MapColumns:
    """The map's rows (the order of `/api/map`) as arrays, for the page's filters."""

    def __init__(self, data: MapData) -> None:
        columns = data.columns
        self.layer = np.array(columns["layer"], dtype=np.int64)
        self.score = np.array([np.nan if s is None else s for s in columns["score"]], dtype=np.float64)
        self.domains = [tuple(d) if d else (OTHER,) for d in columns["domains"]]
        self.all_domains = [*data.header["domains"], *([OTHER] if any(d == (OTHER,) for d in self.domains) else [])]
        self.layers = list(data.header["layers"])
        self.domain_counts = dict.fromkeys(self.all_domains, 0)
        for domains in self.domains:
            for d in domains:
                self.domain_counts[d] += 1
        self.layer_counts = {layer: int((self.layer == layer).sum()) for layer in self.layers}

    def shown(self, filters: MapFilters) -> np.ndarray:
        """Rows shown: layer not hidden, some domain not hidden, score at least the minimum (when above 0)."""
        keep = np.ones(len(self.layer), dtype=bool)
        if filters.hidden_layers:
            keep &= ~np.isin(self.layer, list(filters.hidden_layers))
        if filters.hidden_domains:
            hidden = filters.hidden_domains
            keep &= np.fromiter((any(d not in hidden for d in ds) for ds in self.domains), dtype=bool, count=len(self.domains))
        if filters.min_score > 0:
            keep &= self.score >= filters.min_score  # NaN (no score) compares False
        return keep


_columns: WeakKeyDictionary[MapData, MapColumns] = WeakKeyDictionary()


def map_columns(runtime: SetRuntime) -> MapColumns:
    if runtime.map not in _columns:
        _columns[runtime.map] = MapColumns(runtime.map)
    return _columns[runtime.map]


def page_url(runtime: SetRuntime, q: str | None, filters: MapFilters, highlight: str | None) -> str:
    """The canonical, shareable URL of a map state (defaults left out)."""
    params: list[tuple[str, Any]] = [("sae_set", runtime.info.id)]
    if q and q.strip():
        params.append(("q", q.strip()))
    params += [("hide_domain", d) for d in sorted(filters.hidden_domains)]
    params += [("hide_layer", layer) for layer in sorted(filters.hidden_layers)]
    if filters.min_score > 0:
        params.append(("min_score", f"{filters.min_score:g}"))
    if highlight == "chat":
        params.append(("highlight", "chat"))
    return "/map?" + urlencode(params)


def search_context(runtime: SetRuntime, db, q: str | None) -> dict[str, Any]:
    """The search results partial: the listing of `GET /api/features?q=...` (no filters), best first."""
    query = (q or "").strip()
    items = list_features(runtime, db, query, limit=SEARCH_HITS)["items"] if query else []
    return {"q": query, "items": items[:SEARCH_LISTED], "hits": [item["id"] for item in items], "set_id": runtime.info.id}


def view_context(runtime: SetRuntime, filters: MapFilters) -> dict[str, Any]:
    """The filtered view: how many features are shown, and which rows of `/api/map` (None: all)."""
    columns = map_columns(runtime)
    shown = columns.shown(filters)
    return {"shown": int(shown.sum()), "total": len(shown),
            "visible": None if filters.default else np.flatnonzero(shown).tolist(), "min_score": filters.min_score}


def _filters(runtime: SetRuntime, hidden_domains: Iterable[str], hidden_layers: Iterable[int], min_score: float | None) -> MapFilters:
    unknown = [layer for layer in hidden_layers if layer not in runtime.info.layers]
    if unknown:
        raise field_error(422, "layer", f"layer {unknown[0]} is not in set {runtime.info.name!r} (layers {list(runtime.info.layers)})", "query")
    return MapFilters(frozenset(hidden_domains), frozenset(hidden_layers), min_score or 0.0)


def _form_filters(runtime: SetRuntime, filters: str | None, domain: list[str], layer: list[int],
                  min_score: float | None) -> MapFilters:
    """The filter form names what is shown (its checked boxes, with `filters=1`); without the form, nothing is
    hidden. (A page URL names what is hidden instead: `hide_domain`, `hide_layer`.)"""
    if not filters:
        return _filters(runtime, [], [], min_score)
    columns = map_columns(runtime)
    return _filters(runtime, set(columns.all_domains) - set(domain), set(columns.layers) - set(layer), min_score)


@router.get("/map", response_class=HTMLResponse, include_in_schema=False)
async def map_page(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None, q: Text = None,
                   hide_domain: Names = None, hide_layer: Layers = None, min_score: Score = None, highlight: Short = None):
    runtime = state.resolve_set(sae_set) if state.sets else None
    context: dict[str, Any] = {"page": "map", "highlight": highlight == "chat"}
    if runtime is not None:
        filters = _filters(runtime, hide_domain or [], hide_layer or [], min_score)
        columns = map_columns(runtime)
        context.update(search_context(runtime, db, q), **view_context(runtime, filters), filters=filters,
                       columns=columns, map_header=runtime.map.header,
                       missing_coordinates=runtime.map.n_explained - len(columns.layer))
    return templates.TemplateResponse(request, "map.html", page_context(request, state, runtime, **context))


@router.get("/map/search", response_class=HTMLResponse, include_in_schema=False)
async def map_search(request: Request, state: StateDep, db: SessionDep, sae_set: SetQuery = None, q: Text = None,
                     filters: Short = None, domain: Names = None, layer: Layers = None, min_score: Score = None,
                     highlight: Short = None) -> HTMLResponse:
    """Search as you type: the hits of `q` (pushes the page URL of the whole state)."""
    runtime = state.resolve_set(sae_set)
    state_now = _form_filters(runtime, filters, domain or [], layer or [], min_score)
    return partial(request, "partials/map_search.html", search_context(runtime, db, q),
                   headers={"HX-Push-Url": page_url(runtime, q, state_now, highlight)})


@router.get("/map/view", response_class=HTMLResponse, include_in_schema=False)
async def map_view(request: Request, state: StateDep, sae_set: SetQuery = None, q: Text = None,
                   filters: Short = None, domain: Names = None, layer: Layers = None, min_score: Score = None,
                   highlight: Short = None) -> HTMLResponse:
    """A filter changed: the shown count and rows (pushes the page URL of the whole state)."""
    runtime = state.resolve_set(sae_set)
    state_now = _form_filters(runtime, filters, domain or [], layer or [], min_score)
    return partial(request, "partials/map_view.html", view_context(runtime, state_now),
                   headers={"HX-Push-Url": page_url(runtime, q, state_now, highlight)})


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
