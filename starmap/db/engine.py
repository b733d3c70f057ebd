"""Engines and sessions from any SQLAlchemy URL; SQLite gets the settings a multi-process app needs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for `url`. For a SQLite file, its folder is created and every connection runs
    in WAL mode (readers never block the writer) with foreign keys enforced and a busy timeout."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo)
    event.listen(engine, "connect", _configure_sqlite_connection)
    return engine


def _configure_sqlite_connection(dbapi_connection, _connection_record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


class DatabaseFileError(RuntimeError):
    """A SQLite file that is not a database or fails its integrity check."""


def check_sqlite_file(url: str | URL) -> None:
    """Refuse a corrupted SQLite file before anything writes to it: the file is opened read-only and
    must pass `PRAGMA quick_check`. Other backends, in-memory databases and absent files pass."""
    url = make_url(url)
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if not path.exists():
        return
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        connection.text_factory = lambda raw: raw.decode(errors="replace")  # reports quote damaged bytes
        try:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise DatabaseFileError(f"{path}: not a usable SQLite database ({error})") from None
    if problems != ["ok"]:
        found = " ".join("; ".join(problems[:3]).split())
        raise DatabaseFileError(f"{path}: the SQLite integrity check failed ({found})")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
