"""Migrations from empty to head and back, on SQLite and on a real PostgreSQL server; the engine's SQLite
settings; the `starmap db` verbs; plain `alembic upgrade head` from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from starmap.db import (
    Base,
    Domain,
    Explanation,
    Feature,
    Model,
    Sae,
    SaeSet,
    make_engine,
    make_sessionmaker,
    migrate,
)
from tests.postgres import postgres_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
APP_TABLES = set(Base.metadata.tables)


def schema_diff(url: str) -> list:
    """What autogenerate would still change: empty when the migrations build exactly the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"include_object": _not_fulltext, "compare_type": True}
            )
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _not_fulltext(obj, name, type_, reflected, compare_to) -> bool:
    return not (name or "").startswith(("explanations_fts", "ix_explanations_text_tsv"))


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def sqlite_master(url: str) -> dict[str, set[str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT type, name FROM sqlite_master")).all()
    finally:
        engine.dispose()
    kinds: dict[str, set[str]] = {}
    for kind, name in rows:
        kinds.setdefault(kind, set()).add(name)
    return kinds


def postgres_indexes(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")))
    finally:
        engine.dispose()


def test_sqlite_upgrade_to_head_and_downgrade_to_base(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'starmap.db'}"
    assert migrate.current(url) is None

    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    assert APP_TABLES <= table_names(url)
    assert schema_diff(url) == []
    objects = sqlite_master(url)
    assert "explanations_fts" in objects["table"]
    assert {"explanations_fts_insert", "explanations_fts_update", "explanations_fts_delete"} <= objects["trigger"]

    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    objects = sqlite_master(url)
    assert objects["table"] == {"alembic_version"}
    assert "trigger" not in objects

    migrate.upgrade(url)  # and up again from base
    assert migrate.current(url) == migrate.head()


def test_postgres_upgrade_to_head_and_downgrade_to_base(postgres_server) -> None:  # noqa: F811
    url = postgres_server.create_database()
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    assert APP_TABLES <= table_names(url)
    assert schema_diff(url) == []
    assert "ix_explanations_text_tsv" in postgres_indexes(url)

    migrate.downgrade(url, "-1")  # the monitors, refusal directions and preset figures go; the first schema stays
    assert migrate.current(url) == "0001"
    assert "monitors" not in table_names(url) and "refusal_directions" not in table_names(url)
    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    assert table_names(url) == {"alembic_version"}
    assert "ix_explanations_text_tsv" not in postgres_indexes(url)


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'pragmas.db'}")
    with engine.connect() as connection:
        assert connection.scalar(text("PRAGMA journal_mode")) == "wal"
        assert connection.scalar(text("PRAGMA foreign_keys")) == 1
        assert connection.scalar(text("PRAGMA busy_timeout")) > 0
    engine.dispose()


def test_foreign_keys_cascade_and_the_fulltext_index_follows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cascade.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        model = Model(name="m", n_layers=2, d_model=8, source="test")
        sae_set = SaeSet(model=model, name="s", hook_kind="mlp_out", k=4, expansion=2, d_sae=16, origin="pipeline")
        sae = Sae(sae_set=sae_set, layer=1, hook_name="blocks.1.hook_mlp_out")
        session.add_all([model, sae_set, sae, Domain(name="violence")])
        session.flush()
        feature = Feature(sae=sae, sae_set_id=sae_set.id, layer=1, index=3, feature_id="1_3")
        feature.explanations.append(Explanation(text="knives and swords", language="en", explainer="llm"))
        session.add(feature)
    with engine.begin() as connection:
        assert (
            connection.scalar(text("SELECT count(*) FROM explanations_fts WHERE explanations_fts MATCH 'swords'")) == 1
        )
        connection.execute(text("DELETE FROM models"))
        for table in ("sae_sets", "saes", "features", "explanations"):
            assert connection.scalar(text(f"SELECT count(*) FROM {table}")) == 0, table
        assert (
            connection.scalar(text("SELECT count(*) FROM explanations_fts WHERE explanations_fts MATCH 'swords'")) == 0
        )
        assert connection.scalar(select(Domain.name)) == "violence"
    engine.dispose()


def test_plain_alembic_upgrade_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'alembic.db'}"
    env = {**os.environ, "STARMAP_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert migrate.current(url) == migrate.head()


def test_db_cli_upgrade_info_downgrade(tmp_path: Path) -> None:
    from starmap.cli import app

    runner = CliRunner()
    data_dir = tmp_path / "not-yet-created"
    root = ["--data-dir", str(data_dir)]

    result = runner.invoke(app, [*root, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    database = data_dir / "starmap.db"
    assert database.is_file()
    assert migrate.current(f"sqlite:///{database}") == migrate.head()

    result = runner.invoke(app, [*root, "db", "info"])
    assert result.exit_code == 0, result.output
    assert str(database) in result.output
    assert f"revision: {migrate.head()} (up to date)" in result.output
    counted = {line.split()[0] for line in result.output.splitlines()[2:]}
    assert counted == APP_TABLES

    result = runner.invoke(app, [*root, "db", "downgrade", "--revision", "base"])
    assert result.exit_code == 0, result.output
    assert table_names(f"sqlite:///{database}") == {"alembic_version"}

    result = runner.invoke(app, [*root, "db", "downgrade"])
    assert result.exit_code != 0  # --revision is required: dropping everything is never a default

    result = runner.invoke(app, [*root, "db", "upgrade", "--revision", "nonexistent"])
    assert result.exit_code == 2
    assert "nonexistent" in result.output


def test_a_percent_sign_in_the_url_reaches_alembic_intact(tmp_path: Path) -> None:
    # configparser interpolation would choke on "% o"; the URL must bypass the ini machinery.
    url = f"sqlite:///{tmp_path / '50% off' / 'db.sqlite'}"
    migrate.upgrade(url)
    assert (tmp_path / "50% off" / "db.sqlite").is_file()
    assert migrate.current(url) == migrate.head()
