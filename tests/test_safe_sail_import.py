"""The Safe-SAIL release import on the real release files (read in place from ../shared/data/safe-sail-release):
the paper's counts, Chinese explanations on the same features, idempotence, one transaction, clear errors,
SQLite and PostgreSQL, and the `starmap import safe-sail` verb."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner

from offline_pipeline.safe_sail_import import (
    D_SAE,
    SafeSailImportError,
    SafeSailSources,
    import_safe_sail,
)
from starmap.db import (
    Base,
    Domain,
    Explanation,
    Feature,
    FeatureDomain,
    Model,
    Sae,
    SaeSet,
    Score,
    make_engine,
    make_sessionmaker,
    migrate,
    search_explanations,
)
from starmap.db.search import RANKED_MATCH_LIMIT
from tests.postgres import postgres_server  # noqa: F401  (fixture)

RELEASE = Path(
    os.environ.get("STARMAP_SAFE_SAIL_RELEASE", Path(__file__).resolve().parents[2] / "shared/data/safe-sail-release")
)
LAYERS = [0, 8, 17, 26, 35]

pytestmark = pytest.mark.skipif(
    not (RELEASE / "en_db.json").is_file(), reason=f"Safe-SAIL release data not found at {RELEASE}"
)


def new_database(tmp_path: Path, name: str = "starmap.db") -> Engine:
    url = f"sqlite:///{tmp_path / name}"
    migrate.upgrade(url)
    return make_engine(url)


def run_import(engine: Engine, sources: SafeSailSources):
    with make_sessionmaker(engine).begin() as session:
        return import_safe_sail(session, sources)


def dump(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of every table, ordered by primary key."""
    with engine.connect() as connection:
        return {
            table.name: [tuple(row) for row in connection.execute(select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }


def release_json(name: str) -> dict:
    return json.loads((RELEASE / name).read_text(encoding="utf-8"))


FULL = SafeSailSources(en_db=RELEASE / "en_db.json", zh_db=RELEASE / "cn_db.json", indices_dir=RELEASE)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Engine, object]:
    engine = new_database(tmp_path_factory.mktemp("release"))
    summary = run_import(engine, FULL)
    yield engine, summary
    engine.dispose()


def test_the_papers_counts(imported) -> None:
    engine, summary = imported
    with make_sessionmaker(engine)() as session:
        released = select(Feature).where(Feature.candidate_only.is_(False)).subquery()
        assert session.scalar(select(func.count()).select_from(released)) == 4700
        layers = session.scalars(select(Feature.layer).where(Feature.candidate_only.is_(False)).distinct()).all()
        assert sorted(layers) == LAYERS
        tagged = session.scalar(select(func.count(func.distinct(FeatureDomain.feature_id))))
        assert tagged == 1758
        assert session.scalar(select(func.count()).where(Feature.is_safety.is_(True))) == 1758
        domain_counts = dict(
            session.execute(select(Domain.name, func.count()).join(FeatureDomain).group_by(Domain.name)).all()
        )
        assert domain_counts == {"politics": 1144, "violence": 582, "pornography": 309, "terror": 63}
        assert set(session.scalars(select(FeatureDomain.source))) == {"release"}
    assert (summary.features, summary.tagged_features) == (4700, 1758)
    assert summary.domain_counts == domain_counts


def test_model_set_and_saes(imported) -> None:
    engine, summary = imported
    with make_sessionmaker(engine)() as session:
        [model] = session.scalars(select(Model)).all()
        assert (model.name, model.n_layers, model.d_model) == ("Qwen/Qwen2.5-3B-Instruct", 36, 2048)
        [sae_set] = session.scalars(select(SaeSet)).all()
        assert (sae_set.origin, sae_set.hook_kind, sae_set.k, sae_set.d_sae, sae_set.expansion) == (
            "safe-sail",
            "mlp_out",
            200,
            20480,
            10,
        )
        assert sae_set.id == summary.sae_set_id
        saes = session.scalars(select(Sae).order_by(Sae.layer)).all()
        assert [(s.layer, s.hook_name, s.checkpoint_path) for s in saes] == [
            (layer, f"blocks.{layer}.hook_mlp_out", None) for layer in LAYERS
        ]
        mismatched = session.scalar(
            select(func.count()).select_from(Feature).join(Sae).where(Sae.layer != Feature.layer)
        )
        assert mismatched == 0
        assert session.scalar(select(func.count()).where(Feature.normaliser.is_not(None))) == 0


def test_explanations_and_scores_match_the_release_files(imported) -> None:
    engine, _ = imported
    en, cn = release_json("en_db.json"), release_json("cn_db.json")
    with make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(
                Feature.feature_id,
                Explanation.language,
                Explanation.text,
                Explanation.explainer,
                Explanation.explainer_model,
                Score.method,
                Score.value,
                Score.simulator,
            )
            .join(Explanation, Explanation.feature_id == Feature.id)
            .outerjoin(Score, Score.explanation_id == Explanation.id)
        ).all()
    stored = {(r.feature_id, r.language): r for r in rows}
    assert len(stored) == len(rows)  # one score per explanation
    expected = {(key, "en"): entry for key, entry in en.items() if entry["explanation"] is not None}
    expected |= {(key, "zh"): entry for key, entry in cn.items() if key in en and entry["explanation"] is not None}
    assert stored.keys() == expected.keys()
    for key, row in stored.items():
        assert row.text == expected[key]["explanation"]
        assert (row.explainer, row.explainer_model, row.method, row.simulator) == (
            "release",
            "Safe-SAIL",
            "release",
            "Safe-SAIL",
        )
        assert row.value == en[key[0]]["correlation_score"]
    # The Chinese explanations attach to the very features of the English database.
    zh_features = {feature for feature, language in stored if language == "zh"}
    assert zh_features == set(en)


def test_chinese_only_entries_are_reported_not_imported(imported) -> None:
    engine, summary = imported
    en, cn = release_json("en_db.json"), release_json("cn_db.json")
    zh_only = sorted(set(cn) - set(en))
    assert zh_only and summary.zh_only_skipped == zh_only
    with make_sessionmaker(engine)() as session:
        for key in zh_only:
            feature = session.scalar(select(Feature).where(Feature.feature_id == key))
            # It is among the release's candidates (--indices), but has no explanation, score or tag.
            assert feature is None or (feature.candidate_only and not feature.explanations and not feature.domains)


def test_candidates_from_the_indices_files(imported) -> None:
    engine, summary = imported
    en = release_json("en_db.json")
    candidates = {
        f"{layer}_{index}" for layer in LAYERS for index in torch.load(RELEASE / f"indices_layer{layer}.pt").tolist()
    }
    with make_sessionmaker(engine)() as session:
        all_features = set(session.scalars(select(Feature.feature_id)))
        candidate_only = set(session.scalars(select(Feature.feature_id).where(Feature.candidate_only.is_(True))))
        explained = set(session.scalars(select(Feature.feature_id).join(Explanation).distinct()))
    assert all_features == candidates | set(en)
    assert candidate_only == candidates - set(en)
    assert not candidate_only & explained
    assert summary.candidate_features == len(candidate_only)


def test_search_finds_release_explanations(imported) -> None:
    engine, _ = imported
    en = release_json("en_db.json")
    key = next(k for k, e in en.items() if e["explanation"] and "explosives" in e["explanation"])
    with make_sessionmaker(engine)() as session:
        hits = search_explanations(session, "explosives", limit=1000)
        assert key in {hit.feature_id for hit in hits}
        assert all("explosive" in hit.text.lower() for hit in hits)
        assert search_explanations(session, "'); DROP TABLE features; --") == []
        # A word in thousands of texts is served in id order, without scoring every match.
        with_and = sum(
            1 for e in en.values() if e["explanation"] and re.search(r"\band\b", e["explanation"], re.IGNORECASE)
        )
        assert with_and > RANKED_MATCH_LIMIT
        common = search_explanations(session, "and", limit=50)
        assert len(common) == 50
        assert [hit.explanation_id for hit in common] == sorted(hit.explanation_id for hit in common)
        assert all(re.search(r"\band", hit.text, re.IGNORECASE) for hit in common)
        assert search_explanations(session, "自杀")
        assert session.scalar(select(func.count()).select_from(Feature)) > 0


def test_importing_twice_changes_nothing(imported) -> None:
    engine, _ = imported
    before = dump(engine)
    summary = run_import(engine, FULL)
    assert summary.changed_rows == 0
    assert dump(engine) == before


def test_import_mirrors_its_sources(tmp_path: Path) -> None:
    """Re-importing with fewer sources removes what they no longer provide, and only that."""
    engine = new_database(tmp_path)
    run_import(engine, FULL)
    summary = run_import(engine, SafeSailSources(en_db=RELEASE / "en_db.json"))
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Feature)) == 4700
        assert session.scalar(select(func.count()).where(Feature.candidate_only.is_(True))) == 0
        assert set(session.scalars(select(Explanation.language))) == {"en"}
        assert session.scalar(select(func.count()).select_from(Score)) == session.scalar(
            select(func.count()).select_from(Explanation)
        )
    assert summary.changes["features"]["deleted"] > 0
    assert summary.changes["explanations"]["deleted"] > 0
    assert summary.changes["feature_domains"]["deleted"] == 0
    engine.dispose()


def test_checkpoints_and_quantiles(tmp_path: Path) -> None:
    checkpoints, quantiles = tmp_path / "ckpt", tmp_path / "quantiles"
    checkpoints.mkdir()
    quantiles.mkdir()
    normalisers = {}
    for layer in LAYERS:
        (checkpoints / f"ckpt_layer{layer}.pt").write_bytes(b"not read by the import")
        normalisers[layer] = torch.rand(D_SAE, dtype=torch.float32) + 0.5
        torch.save(normalisers[layer], quantiles / f"quantiles_layer{layer}.pt")
    engine = new_database(tmp_path)
    run_import(
        engine, SafeSailSources(en_db=RELEASE / "en_db.json", checkpoints_dir=checkpoints, quantiles_dir=quantiles)
    )
    with make_sessionmaker(engine)() as session:
        paths = dict(session.execute(select(Sae.layer, Sae.checkpoint_path)).all())
        assert paths == {layer: str((checkpoints / f"ckpt_layer{layer}.pt").resolve()) for layer in LAYERS}
        rows = session.execute(select(Feature.layer, Feature.index, Feature.normaliser)).all()
    assert len(rows) == 4700
    for layer, index, normaliser in rows:
        assert normaliser == float(normalisers[layer][index])
    engine.dispose()


def assert_refused(engine: Engine, sources: SafeSailSources, *message_parts: str) -> None:
    before = dump(engine)
    with pytest.raises(SafeSailImportError) as error:
        run_import(engine, sources)
    for part in message_parts:
        assert part in str(error.value)
    assert dump(engine) == before


def test_bad_inputs_are_refused_with_the_file_and_entry_named(tmp_path: Path) -> None:
    engine = new_database(tmp_path)
    run_import(engine, SafeSailSources(en_db=RELEASE / "en_db.json"))  # a populated database must survive too

    assert_refused(engine, SafeSailSources(en_db=tmp_path / "missing.json"), "missing.json", "not found")

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(RELEASE.joinpath("en_db.json").read_text(encoding="utf-8")[:5000])
    assert_refused(engine, SafeSailSources(en_db=corrupt), str(corrupt), "not valid JSON")

    en = release_json("en_db.json")
    key = next(iter(en))
    for field, value, complaint in [
        ("correlation_score", "high", "correlation_score"),
        ("tag_list", "violence", "tag_list"),
        ("explanation", 3, "explanation"),
    ]:
        broken = tmp_path / f"broken_{field}.json"
        broken.write_text(json.dumps({**en, key: {**en[key], field: value}}))
        assert_refused(
            engine, SafeSailSources(en_db=RELEASE / "en_db.json", zh_db=broken), str(broken), repr(key), complaint
        )
    broken = tmp_path / "bad_key.json"
    broken.write_text(json.dumps({**en, "17-1": en[key]}))
    assert_refused(engine, SafeSailSources(en_db=broken), str(broken), "'17-1'")

    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    for layer in LAYERS[:-1]:
        (checkpoints / f"ckpt_layer{layer}.pt").write_bytes(b"")
    assert_refused(
        engine,
        SafeSailSources(en_db=RELEASE / "en_db.json", checkpoints_dir=checkpoints),
        str(checkpoints / "ckpt_layer35.pt"),
    )

    indices = tmp_path / "indices"
    indices.mkdir()
    for layer in LAYERS:
        shutil.copy(RELEASE / f"indices_layer{layer}.pt", indices)
    (indices / "indices_layer17.pt").write_bytes(b"garbage")
    assert_refused(
        engine,
        SafeSailSources(en_db=RELEASE / "en_db.json", indices_dir=indices),
        str(indices / "indices_layer17.pt"),
        "torch.load",
    )

    quantiles = tmp_path / "quantiles"
    quantiles.mkdir()
    for layer in LAYERS:
        torch.save(torch.ones(100), quantiles / f"quantiles_layer{layer}.pt")
    assert_refused(
        engine,
        SafeSailSources(en_db=RELEASE / "en_db.json", quantiles_dir=quantiles),
        "quantiles_layer0.pt",
        str(D_SAE),
    )
    engine.dispose()


def test_a_database_failure_midway_rolls_everything_back(tmp_path: Path) -> None:
    engine = new_database(tmp_path)
    with engine.begin() as connection:  # the database itself refuses the scores, written after everything else
        connection.execute(
            text(
                "CREATE TRIGGER refuse_scores BEFORE INSERT ON scores BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        )
    with pytest.raises(SQLAlchemyError, match="refused by test"):
        run_import(engine, FULL)
    assert all(rows == [] for rows in dump(engine).values())
    engine.dispose()


def test_import_into_postgres(postgres_server) -> None:  # noqa: F811
    url = postgres_server.create_database()
    migrate.upgrade(url)
    engine = make_engine(url)
    run_import(engine, FULL)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).where(Feature.candidate_only.is_(False))) == 4700
        assert session.scalar(select(func.count()).where(Feature.is_safety.is_(True))) == 1758
        domain_counts = dict(
            session.execute(select(Domain.name, func.count()).join(FeatureDomain).group_by(Domain.name)).all()
        )
        assert domain_counts == {"politics": 1144, "violence": 582, "pornography": 309, "terror": 63}
        assert Counter(session.scalars(select(Explanation.language))) == Counter(
            {"en": sum(1 for e in release_json("en_db.json").values() if e["explanation"] is not None), "zh": 4700}
        )
        hits = search_explanations(session, "explosives", limit=1000)
        assert hits and all("explosive" in hit.text.lower() for hit in hits)
    before = dump(engine)
    assert run_import(engine, FULL).changed_rows == 0
    assert dump(engine) == before
    engine.dispose()


def test_import_cli(tmp_path: Path) -> None:
    from starmap.cli import app

    runner = CliRunner()
    root = ["--database-url", f"sqlite:///{tmp_path / 'cli.db'}"]
    args = [*root, "import", "safe-sail", "--db", str(RELEASE / "en_db.json"), "--db-zh", str(RELEASE / "cn_db.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "features: 4,700 with a release entry" in result.output
    assert "safety features (with a domain tag): 1,758" in result.output
    assert "skipped 1 Chinese entries absent from en_db.json: " in result.output

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rows changed: none (already imported)" in result.output

    result = runner.invoke(app, [*root, "import", "safe-sail", "--db", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "nope.json: file not found" in result.output
