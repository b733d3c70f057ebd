"""Run the Alembic migrations in `migrations/` programmatically (no alembic.ini needed).

The app and the pipeline call `upgrade(url)` when they start, so a database is always at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from starmap.db.engine import make_engine

# The repository root holds `migrations/` next to the `starmap` package; an editable install
# imports `starmap` from the repository itself, so this resolves there too.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir() -> Path:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}: StarMap must run from its source tree "
            "(pip install -e .), which keeps migrations/ next to the starmap package"
        )
    return MIGRATIONS_DIR


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # Handed over as an attribute, not an ini option: configparser would choke on a '%' in a password.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    head_revision = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head_revision is None:
        raise RuntimeError(f"no migration revisions in {migrations_dir() / 'versions'}")
    return head_revision
