"""`starmap db upgrade | downgrade | info`."""

from __future__ import annotations

from typing import Annotated

import typer
from alembic.util import CommandError
from sqlalchemy import func, inspect, select, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from starmap.db import migrate
from starmap.db.engine import make_engine
from starmap.db.models import Base

db_app = typer.Typer(name="db", help="Create, migrate and inspect the StarMap database.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


def database_url(ctx: typer.Context) -> str:
    """The database URL of this invocation; the data folder exists afterwards (it holds the default SQLite file)."""
    from starmap.cli import fail, settings_of

    settings = settings_of(ctx)
    try:
        if settings.database_url is None:
            settings.ensure_data_dir()
        make_url(settings.resolved_database_url)
        return settings.resolved_database_url
    except OSError as error:
        raise fail(f"data directory {settings.data_dir}: {error.strerror or error}") from None
    except ArgumentError:
        raise fail(f"database URL {settings.resolved_database_url!r} is not a SQLAlchemy URL") from None


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def upgrade_command(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision (default: the newest).")] = "head",
) -> None:
    """Migrate the database up to a revision, creating it if needed."""
    from starmap.cli import fail

    url = database_url(ctx)
    try:
        migrate.upgrade(url, revision)
    except (CommandError, SQLAlchemyError) as error:
        raise fail(f"upgrade of {shown_url(url)} to {revision!r} failed: {error}") from error
    typer.echo(f"{shown_url(url)}: at revision {migrate.current(url)}")


@db_app.command("downgrade")
def downgrade_command(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision: 'base' (drops everything), '-1', or an id.")],
) -> None:
    """Migrate the database down to a revision."""
    from starmap.cli import fail

    url = database_url(ctx)
    try:
        migrate.downgrade(url, revision)
    except (CommandError, SQLAlchemyError) as error:
        raise fail(f"downgrade of {shown_url(url)} to {revision!r} failed: {error}") from error
    typer.echo(f"{shown_url(url)}: at revision {migrate.current(url) or 'base (empty)'}")


@db_app.command("info")
def info_command(ctx: typer.Context) -> None:
    """Show the database URL, its revision and the row count of every table."""
    from starmap.cli import fail

    url = database_url(ctx)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            present = set(inspect(connection).get_table_names())
            counts = {
                name: connection.scalar(select(func.count()).select_from(table(name)))
                for name in Base.metadata.tables
                if name in present
            }
    except SQLAlchemyError as error:
        raise fail(f"cannot read {shown_url(url)}: {error}") from error
    finally:
        engine.dispose()
    current = migrate.current(url)
    head = migrate.head()
    typer.echo(f"url: {shown_url(url)}")
    state = "up to date" if current == head else f"head is {head}: run `starmap db upgrade`"
    typer.echo(f"revision: {current or 'none (empty database)'} ({state})")
    for name, count in counts.items():
        typer.echo(f"{name:<18} {count:>10,}")
