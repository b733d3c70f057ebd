"""Alembic environment. The database URL comes from, in order: a connection or URL handed over by
`starmap.db.migrate` (`config.attributes`), `sqlalchemy.url` in the ini file, the StarMap settings."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from starmap.db.engine import make_engine
from starmap.db.models import Base
from starmap.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Keep autogenerate away from the full-text index, which only the migrations manage."""
    fts_table = type_ == "table" and name.startswith("explanations_fts")
    tsv_index = type_ == "index" and name == "ix_explanations_text_tsv"
    return not (fts_table or tsv_index)


def database_url() -> str:
    return (
        config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url
    )


def run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        include_object=include_object,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


def _run_on(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
