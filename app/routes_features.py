"""Feature pages, `GET /api/features/{id}`, and the feature list / text search `GET /api/features`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.deps import (
    SessionDep,
    SetQuery,
    StateDep,
    errors,
    field_error,
    page_context,
    parse_feature_id,
    templates,
)
from app.queries import FeatureMeta, feature_detail, matching_explanations
from app.schemas import FeatureListOut, FeatureOut
from app.state import SetRuntime
from app.steering import FEATURE_ID_PATTERN

router = APIRouter()

N_NEIGHBOURS = 10


def _meta(runtime: SetRuntime, feature_id: str) -> FeatureMeta:
    parse_feature_id(feature_id)
    meta = runtime.catalog.get(feature_id)
    if meta is None:
        raise HTTPException(404, detail=[{"loc": ["path", "feature_id"], "type": "not_found",
                                          "msg": f"feature {feature_id} is not in set {runtime.info.name!r}"}])
    return meta


def neighbours(runtime: SetRuntime, meta: FeatureMeta) -> tuple[list[dict] | None, str | None]:
    """Nearest features of the same layer by cosine of decoder directions (needs the checkpoints)."""
    bundle = runtime.bundle
    if bundle is None:
        return None, runtime.live_error
    slot = bundle.slot(meta.layer)
    decoder = bundle.W_dec[slot]
    direction = decoder[meta.index]
    cosine = (decoder @ direction) / (decoder.norm(dim=1) * direction.norm()).clamp_min(1e-12)
    cosine[meta.index] = -2.0
    values, indices = cosine.topk(min(N_NEIGHBOURS, bundle.d_sae - 1))
    out = []
    for value, index in zip(values.tolist(), indices.tolist()):
        fid = f"{meta.layer}_{index}"
        other = runtime.catalog.get(fid)
        out.append({"id": fid, "cosine": round(value, 4), "explanation": other.explanation if other else None,
                    "domains": other.domains if other else []})
    return out, None


def output_tokens(value: list | None) -> list[dict[str, Any]]:
    """Top/bottom output tokens as `{"token", "value"}` whatever shape the writer used."""
    out = []
    for item in value or []:
        if isinstance(item, dict):
            out.append({"token": str(item.get("token", "")), "value": item.get("value")})
        elif isinstance(item, (list, tuple)) and item:
            out.append({"token": str(item[0]), "value": item[1] if len(item) > 1 else None})
        else:
            out.append({"token": str(item), "value": None})
    return out


def feature_payload(runtime: SetRuntime, meta: FeatureMeta, db: Session) -> dict[str, Any]:
    detail = feature_detail(db, meta.pk)
    detail["top_tokens"] = output_tokens(detail["top_tokens"])
    detail["bottom_tokens"] = output_tokens(detail["bottom_tokens"])
    near, near_error = neighbours(runtime, meta)
    domain_sources = detail.pop("domains")
    cosines = runtime.refusal_cosines(meta.layer)
    cosine = float(cosines[meta.index]) if cosines is not None else None
    share = float((cosines >= cosines[meta.index]).float().mean()) if cosines is not None else None
    return {**meta.public(), **detail, "sae_set": runtime.describe(), "domain_sources": domain_sources,
            "neighbours": near, "neighbours_error": near_error,
            "refusal_cosine": None if cosine is None else round(cosine, 4),
            "refusal_cosine_share": None if share is None else round(share, 4)}


@router.get("/features/{feature_id}", response_class=HTMLResponse, include_in_schema=False)
async def feature_page(request: Request, feature_id: str, state: StateDep, db: SessionDep,
                       sae_set: SetQuery = None):
    runtime = state.resolve_set(sae_set)
    feature = feature_payload(runtime, _meta(runtime, feature_id), db)
    return templates.TemplateResponse(request, "feature.html", page_context(request, state, runtime, page="feature", feature=feature))


@router.get("/api/features/{feature_id}", response_model=FeatureOut, responses=errors(404),
            summary="One feature: everything the feature page shows")
async def feature_json(
    feature_id: Annotated[str, Path(pattern=FEATURE_ID_PATTERN, description='"{layer}_{index}"', examples=["2_17"])],
    state: StateDep,
    db: SessionDep,
    sae_set: SetQuery = None,
) -> dict[str, Any]:
    runtime = state.resolve_set(sae_set)
    return feature_payload(runtime, _meta(runtime, feature_id), db)


@router.get(
    "/api/features",
    response_model=FeatureListOut,
    responses=errors(404),
    summary="List or search features",
    description="Features ranked explained first, then by headline score (then layer, index). With `q`, only features "
    "with an explanation containing every word of `q` (each as a word prefix, full-text index), in the same order. "
    "Filters apply to both.",
)
async def feature_list(
    state: StateDep,
    db: SessionDep,
    q: str | None = Query(default=None, max_length=200),
    domain: str | None = Query(default=None, max_length=64),
    layer: int | None = Query(default=None, ge=0, le=1000),
    min_score: float | None = Query(default=None, ge=-1.0, le=1.0),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0, le=1_000_000),
    sae_set: SetQuery = None,
) -> dict[str, Any]:
    runtime = state.resolve_set(sae_set)
    return list_features(runtime, db, q, domain, layer, min_score, limit, offset)


def list_features(runtime: SetRuntime, db: Session, q: str | None, domain: str | None = None, layer: int | None = None,
                  min_score: float | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """The listing / search of `GET /api/features`, also behind the pages' search partials."""
    if layer is not None and layer not in runtime.info.layers:
        raise field_error(422, "layer", f"layer {layer} is not in set {runtime.info.name!r} (layers {list(runtime.info.layers)})", "query")
    hits = matching_explanations(db, q) if q and q.strip() else None
    positions = runtime.index.select(layer, domain, min_score, hits)
    page = [runtime.index.ranked[i] for i in positions[offset:offset + limit].tolist()]
    return {"sae_set": runtime.info.id, "offset": offset, "limit": limit, "has_more": len(positions) > offset + limit,
            "items": [m.public() for m in page]}
