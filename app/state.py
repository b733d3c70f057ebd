"""The loaded runtime of the server: database, model, and per SAE set its catalog, SAEs and map.

Built once at start-up (`load_state`) and handed to routes through `Depends(get_state)`.
A set whose model is not the loaded one, or whose checkpoints are missing, stays browsable
(map, feature pages, search); `SetRuntime.live_error` says why it cannot overlay or steer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import HTTPException, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.cost_cache import CostCache
from app.feature_index import FeatureIndex
from app.generation import GenerationQueue
from app.monitor import Monitors
from app.overlay import FeatureMasks
from app.queries import (
    FeatureMeta,
    SetInfo,
    explanation_owners,
    feature_catalog,
    monitor_rows,
    refusal_directions,
    sae_sets,
)
from sae_engine.checkpoints import CheckpointError, load_saelens, load_safe_sail
from sae_engine.inference import SAEBundle
from sae_engine.models import LoadedModel, ModelLoadError, load_model
from starmap.db import make_engine, make_sessionmaker, upgrade
from starmap.settings import Settings

log = logging.getLogger("starmap.app")

PROJECTION = "coordinates: the database's umap_x/umap_y (StarMap's pipeline projects SAE decoder directions with UMAP, cosine metric)"
MAP_TEXT_CHARS = 240


@dataclass(frozen=True)
class ServerOptions:
    queue_size: int = 8
    max_new_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_message_chars: int = 16_000
    max_messages: int = 64
    top_n: int = 12
    load_model: bool = True
    # How long a request waits for another process's write lock (a pipeline writing the served
    # database) before it answers 503: short, because the request holds its client meanwhile.
    db_lock_timeout_s: float = 2.0


class MapData:
    """The explained features of a set with map coordinates, columnar, serialised once."""

    def __init__(self, info: SetInfo, catalog: dict[str, FeatureMeta]) -> None:
        metas = sorted(
            (m for m in catalog.values() if m.explained and m.umap_x is not None and m.umap_y is not None),
            key=lambda m: (m.layer, m.index),
        )
        self.n_explained = sum(1 for m in catalog.values() if m.explained)
        self.columns = {
            "id": [m.feature_id for m in metas],
            "x": [round(m.umap_x, 5) for m in metas],
            "y": [round(m.umap_y, 5) for m in metas],
            "layer": [m.layer for m in metas],
            "domains": [m.domains for m in metas],
            "score": [None if m.score is None else round(m.score, 4) for m in metas],
            "explanation": [(m.explanation or "")[:MAP_TEXT_CHARS] for m in metas],
        }
        self._layer = np.array(self.columns["layer"], dtype=np.int64)
        self._score = np.array([np.nan if s is None else s for s in self.columns["score"]], dtype=np.float64)
        self._domains = self.columns["domains"]
        self.header = {
            "sae_set": {"id": info.id, "name": info.name, "model": info.model_name},
            "projection": PROJECTION,
            "n_explained": self.n_explained,
            "layers": list(info.layers),
            "domains": sorted({d for m in metas for d in m.domains}),
        }
        self.full = self._serialise(self.columns)

    def _serialise(self, columns: dict[str, list]) -> bytes:
        payload = {**self.header, "n": len(columns["id"]), "features": columns}
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()

    def filtered(self, domain: str | None, layer: int | None, min_score: float | None) -> bytes:
        if domain is None and layer is None and min_score is None:
            return self.full
        keep = np.ones(len(self._layer), dtype=bool)
        if layer is not None:
            keep &= self._layer == layer
        if min_score is not None:
            keep &= self._score >= min_score  # NaN (no score) compares False
        if domain is not None:
            keep &= np.fromiter((domain in d for d in self._domains), dtype=bool, count=len(self._domains))
        rows = np.flatnonzero(keep).tolist()
        return self._serialise({name: [values[i] for i in rows] for name, values in self.columns.items()})


@dataclass
class SetRuntime:
    info: SetInfo
    catalog: dict[str, FeatureMeta]
    map: MapData
    index: FeatureIndex
    bundle: SAEBundle | None = None
    masks: FeatureMasks | None = None
    live_error: str | None = None
    overlay_note: str | None = None
    monitors: Monitors | None = None
    directions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> refusal direction
    costs: CostCache = field(default_factory=CostCache)
    suggested: dict[int, list[dict]] = field(default_factory=dict, repr=False)  # n -> refusal_suggestions(n)

    def steering_cost(self, model: LoadedModel, interventions: list) -> dict:
        """The capability cost of an edit on this set's live model (cached per edit)."""
        assert self.bundle is not None
        return self.costs.cost(model, self.bundle, interventions, self.directions)

    def refusal_cosines(self, layer: int) -> torch.Tensor | None:
        """(d_sae,) each decoder direction's cosine with `layer`'s refusal direction; None without one."""
        if self.bundle is None or layer not in self.directions:
            return None
        decoder = self.bundle.W_dec[self.bundle.slot(layer)].float()
        direction = self.directions[layer].float().to(decoder.device)
        return (decoder @ direction) / (decoder.norm(dim=1) * direction.norm()).clamp_min(1e-12)

    def refusal_suggestions(self, n: int) -> list[dict]:
        """The `n` features whose decoder directions point most along a refusal direction and the `n` most against
        it, over every layer with one: adding the first pushes towards refusing, adding the second away from it."""
        if n not in self.suggested:
            self.suggested[n] = self._suggest(n)
        return self.suggested[n]

    def _suggest(self, n: int) -> list[dict]:
        scored = []
        for layer in sorted(self.directions):
            cosines = self.refusal_cosines(layer)
            assert cosines is not None
            for sign in (1.0, -1.0):
                values, indices = (sign * cosines).topk(min(n, cosines.numel()))
                scored += [(sign * v, f"{layer}_{i}") for v, i in zip(values.tolist(), indices.tolist())]
        ranked = sorted({fid: c for c, fid in scored}.items(), key=lambda item: -abs(item[1]))
        towards = [item for item in ranked if item[1] > 0][:n]
        away = [item for item in ranked if item[1] < 0][:n]
        return [{"id": fid, "cosine": round(c, 4), "meta": self.catalog.get(fid)} for fid, c in towards + away]

    @property
    def live(self) -> bool:
        return self.bundle is not None

    def describe(self) -> dict:
        return {
            "id": self.info.id,
            "name": self.info.name,
            "model": self.info.model_name,
            "origin": self.info.origin,
            "hook_kind": self.info.hook_kind,
            "k": self.info.k,
            "d_sae": self.info.d_sae,
            "layers": list(self.info.layers),
            "n_features": len(self.catalog),
            "n_explained": self.map.n_explained,
            "live": self.live,
            "live_error": self.live_error,
            "overlay_note": self.overlay_note,
        }


@dataclass
class AppState:
    settings: Settings
    options: ServerOptions
    engine: Engine
    sessions: sessionmaker[Session]
    queue: GenerationQueue
    model: LoadedModel | None = None
    model_error: str | None = None
    sets: dict[int, SetRuntime] = field(default_factory=dict)

    @property
    def default_set(self) -> SetRuntime | None:
        live = [s for s in self.sets.values() if s.live]
        return (live or list(self.sets.values()) or [None])[0]

    def resolve_set(self, ref: str | None) -> SetRuntime:
        """A set by id or name (None: the default set); 404 naming `sae_set` otherwise."""
        if ref is None or ref == "":
            found = self.default_set
            if found is None:
                raise HTTPException(404, detail=_field_error("sae_set", "the database holds no SAE set yet"))
            return found
        for runtime in self.sets.values():
            if str(runtime.info.id) == ref or runtime.info.name == ref:
                return runtime
        names = [f"{s.info.id} ({s.info.name})" for s in self.sets.values()]
        raise HTTPException(404, detail=_field_error("sae_set", f"no SAE set {ref!r}; sets: {names}"))

    def close(self) -> None:
        self.engine.dispose()


def _field_error(name: str, message: str, where: str = "query") -> list[dict]:
    return [{"loc": [where, name], "msg": message, "type": "value_error"}]


def get_state(request: Request) -> AppState:
    return request.app.state.starmap


def load_state(settings: Settings, options: ServerOptions) -> AppState:
    url = settings.resolved_database_url
    if settings.database_url is None:
        settings.ensure_data_dir()
    upgrade(url)
    engine = make_engine(url, lock_timeout_ms=round(options.db_lock_timeout_s * 1000))
    state = AppState(settings, options, engine, make_sessionmaker(engine), GenerationQueue(options.queue_size))
    if options.load_model:
        try:
            state.model = load_model(settings.served_model, settings.data_dir, settings.device, settings.dtype)
        except (ModelLoadError, OSError, ValueError) as error:
            state.model_error = f"model {settings.served_model!r} could not be loaded: {error}"
            log.error(state.model_error)
    else:
        state.model_error = "the server was started without a model (browse only)"
    with state.sessions() as session:
        for info in sae_sets(session):
            catalog = feature_catalog(session, info.id)
            index = FeatureIndex(catalog, explanation_owners(session, info.id))
            runtime = SetRuntime(info, catalog, MapData(info, catalog), index)
            attach_saes(runtime, state)
            if runtime.bundle is not None:
                runtime.monitors = Monitors(monitor_rows(session, info.id), runtime.bundle) or None
                runtime.directions = {
                    layer: torch.tensor(values, dtype=torch.float32, device=runtime.bundle.device)
                    for layer, values in refusal_directions(session, info.id).items()
                    if layer in runtime.bundle.layers
                }
            state.sets[info.id] = runtime
    return state


def attach_saes(runtime: SetRuntime, state: AppState) -> None:
    """Load the set's SAEs onto the model's device when the set belongs to the loaded model."""
    info, model = runtime.info, state.model
    if model is None:
        runtime.live_error = f"live overlay and steering need the model {info.model_name!r}: {state.model_error}"
        return
    if info.model_name != model.name:
        runtime.live_error = (
            f"set {info.name!r} reads {info.model_name!r}, but the server runs {model.name!r}; "
            f"start it with `starmap serve --model {info.model_name}` for live overlay and steering"
        )
        return
    if not info.saes:
        runtime.live_error = f"set {info.name!r} has no SAEs recorded"
        return
    missing = [s for s in info.saes if not s.checkpoint_path or not _resolve(s.checkpoint_path, state).exists()]
    if missing:
        shown = ", ".join(f"layer {s.layer}: {s.checkpoint_path or 'no path recorded'}" for s in missing)
        runtime.live_error = f"live overlay needs the SAE checkpoints of set {info.name!r}; missing: {shown}"
        return
    try:
        saes = {}
        for sae in info.saes:
            path = _resolve(sae.checkpoint_path, state)
            if path.is_dir():
                loaded = load_saelens(path, expect_d_in=model.d_model, expect_model=model.name)
            else:
                loaded = load_safe_sail(path, sae.layer, k=info.k, expect_d_in=model.d_model)
            if loaded.sae.d_sae != info.d_sae:
                raise CheckpointError(f"{path}: the SAE has {loaded.sae.d_sae} latents, the database's set {info.d_sae}")
            saes[sae.hook_name] = loaded.sae
    except CheckpointError as error:
        runtime.live_error = f"the SAE checkpoints of set {info.name!r} could not be loaded: {error}"
        log.error("%s (set %r stays browse-only)", runtime.live_error, info.name)
        return
    normalisers = {}
    for sae in info.saes:
        values = torch.full((info.d_sae,), float("inf"))
        normalisers[sae.hook_name] = values
    for meta in runtime.catalog.values():
        if meta.normaliser and meta.layer in info.layers and 0 <= meta.index < info.d_sae:
            normalisers[_hook_of(info, meta.layer)][meta.index] = meta.normaliser
    # The overlay encode runs in the model's precision: bf16 halves the SAE bytes read per token.
    compute = model.dtype if model.dtype in (torch.bfloat16, torch.float16) else torch.float32
    runtime.bundle = SAEBundle.from_saes(saes, normalisers, compute_dtype=compute, device=model.device)
    runtime.masks = FeatureMasks(runtime.bundle.layers, info.d_sae, runtime.catalog)
    if not bool(runtime.masks.counted.any()):
        runtime.overlay_note = (
            f"no feature of set {info.name!r} has a normaliser together with an explanation or a safety tag, so no "
            "token can be tinted; steering by scale or ablate still works (for the Safe-SAIL import, add the "
            "per-feature normalisers with --quantiles)"
        )


def _hook_of(info: SetInfo, layer: int) -> str:
    return next(s.hook_name for s in info.saes if s.layer == layer)


def _resolve(path: str, state: AppState) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else state.settings.data_dir / candidate
