"""The server's read helpers on a small database built through the ORM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from starmap.db import (
    Domain,
    Explanation,
    Feature,
    FeatureDomain,
    Model,
    Sae,
    SaeSet,
    Score,
    make_engine,
    migrate,
)
from starmap.db.engine import make_sessionmaker
from starmap.db.queries import (
    best_explanations,
    domains_of,
    feature_by_id,
    features_for_ids,
)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'queries.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        model = Model(name="m", n_layers=4, d_model=8)
        sae_sets = [
            SaeSet(model=model, name=name, hook_kind="mlp_out", k=2, expansion=2, d_sae=16, origin="pipeline")
            for name in ("one", "two")
        ]
        violence, terror = Domain(name="violence"), Domain(name="terror")
        session.add_all([model, *sae_sets, violence, terror])
        session.flush()
        for sae_set in sae_sets:
            sae = Sae(sae_set=sae_set, layer=3, hook_name="blocks.3.hook_mlp_out")
            for index in range(3):
                session.add(Feature(sae=sae, sae_set_id=sae_set.id, layer=3, index=index, feature_id=f"3_{index}"))
        session.flush()
        one = {f.feature_id: f for f in session.query(Feature).filter_by(sae_set_id=sae_sets[0].id)}
        one["3_0"].explanations = [
            Explanation(text="low", language="en", explainer="llm", scores=[Score(method="sls", value=0.2)]),
            Explanation(text="high", language="en", explainer="llm", scores=[Score(method="sls", value=0.6)]),
            Explanation(text="undefined", language="en", explainer="llm", scores=[Score(method="sls", value=None)]),
            Explanation(text="中文", language="zh", explainer="release", scores=[Score(method="release", value=0.3)]),
        ]
        one["3_1"].explanations = [Explanation(text="only chinese", language="zh", explainer="release")]
        session.add_all(
            [
                FeatureDomain(feature_id=one["3_0"].id, domain_id=violence.id, source="filter"),
                FeatureDomain(feature_id=one["3_0"].id, domain_id=terror.id, source="filter"),
            ]
        )
        session.commit()
        yield session
    engine.dispose()


def test_features_by_id_stay_within_their_set(session: Session) -> None:
    one, two = (s.id for s in session.query(SaeSet).order_by(SaeSet.id))
    found = features_for_ids(session, one, ["3_0", "3_2", "3_9", "3_0"])
    assert sorted(found) == ["3_0", "3_2"]
    assert {f.sae_set_id for f in found.values()} == {one}
    assert feature_by_id(session, two, "3_1").sae_set_id == two
    assert feature_by_id(session, two, "3_9") is None


def test_best_explanation_prefers_the_language_then_the_score(session: Session) -> None:
    one = session.query(SaeSet).order_by(SaeSet.id).first().id
    features = features_for_ids(session, one, ["3_0", "3_1", "3_2"])
    pks = [f.id for f in features.values()]
    english = best_explanations(session, pks, "en")
    assert (english[features["3_0"].id].text, english[features["3_0"].id].score) == ("high", 0.6)
    assert english[features["3_1"].id].text == "only chinese"  # no English one: any language
    assert english[features["3_1"].id].score is None
    assert features["3_2"].id not in english
    chinese = best_explanations(session, pks, "zh")
    assert (chinese[features["3_0"].id].text, chinese[features["3_0"].id].score_method) == ("中文", "release")


def test_domains_of(session: Session) -> None:
    one = session.query(SaeSet).order_by(SaeSet.id).first().id
    features = features_for_ids(session, one, ["3_0", "3_1"])
    assert domains_of(session, [f.id for f in features.values()]) == {features["3_0"].id: ["terror", "violence"]}
