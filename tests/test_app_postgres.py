"""The browse side of the app (catalog, map, search, feature pages, presets) on PostgreSQL."""

from __future__ import annotations

import httpx
from postgres import postgres_server  # noqa: F401

from app.loopback_server import serve_on_loopback
from app.main import create_app
from app.state import ServerOptions
from starmap.db import make_engine, make_sessionmaker, upgrade
from starmap.db.models import (
    Domain,
    Explanation,
    Feature,
    FeatureDomain,
    Model,
    Sae,
    SaeSet,
    Score,
)
from starmap.settings import Settings

TEXTS = {
    "0_1": "weapons and explosive devices",
    "0_2": "election campaigns and political parties",
    "3_7": "weaponry in historical battles",
    "3_8": "cooking recipes",
}


def test_browse_api_on_postgresql(postgres_server, tmp_path) -> None:  # noqa: F811
    url = postgres_server.create_database()
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        violence = Domain(name="violence")
        model = Model(name="some/model", n_layers=4, d_model=8, source="test")
        sae_set = SaeSet(model=model, name="pg-set", hook_kind="mlp_out", k=4, expansion=2, d_sae=16, origin="pipeline")
        session.add_all([violence, model, sae_set])
        session.flush()
        saes = {layer: Sae(sae_set_id=sae_set.id, layer=layer, hook_name=f"blocks.{layer}.hook_mlp_out") for layer in (0, 3)}
        session.add_all(saes.values())
        session.flush()
        for i, (fid, text) in enumerate(TEXTS.items()):
            layer, index = map(int, fid.split("_"))
            feature = Feature(sae_id=saes[layer].id, sae_set_id=sae_set.id, layer=layer, index=index, feature_id=fid,
                              normaliser=1.0, umap_x=float(i), umap_y=float(-i), is_safety="weapon" in text,
                              histogram={"edges": [0, 1, 2], "counts": [3, 1]})
            session.add(feature)
            session.flush()
            explanation = Explanation(feature_id=feature.id, text=text, language="en", explainer="llm")
            session.add(explanation)
            session.flush()
            session.add(Score(explanation_id=explanation.id, method="sls", value=0.9 - 0.1 * i))
            if "weapon" in text:
                session.add(FeatureDomain(feature_id=feature.id, domain_id=violence.id, source="filter"))
        session.commit()
    engine.dispose()

    app = create_app(Settings(data_dir=tmp_path, database_url=url), ServerOptions(load_model=False))
    with serve_on_loopback(app) as base, httpx.Client(base_url=base) as http:
        hits = http.get("/api/features", params={"q": "weap"}).json()["items"]
        assert [h["id"] for h in hits] == ["0_1", "3_7"]  # both match the prefix; ranked by score
        assert [h["id"] for h in http.get("/api/features", params={"q": "weap", "layer": 3}).json()["items"]] == ["3_7"]
        assert http.get("/api/features", params={"q": "election parties"}).json()["items"][0]["id"] == "0_2"
        assert http.get("/api/features", params={"q": "'); DROP TABLE features; --"}).json()["items"] == []
        assert http.get("/api/map").json()["n"] == 4
        assert http.get("/api/map", params={"domain": "violence"}).json()["features"]["id"] == ["0_1", "3_7"]
        detail = http.get("/api/features/3_7").json()
        assert detail["explanations"][0]["scores"][0]["method"] == "sls" and detail["domains"] == ["violence"]
        assert detail["neighbours"] is None
        saved = http.post("/api/presets", json={"name": "pg", "interventions": [{"feature": "0_1", "mode": "ablate"}]})
        assert saved.status_code == 201
        assert http.get("/api/presets/pg").json()["interventions"][0]["feature"] == "0_1"
