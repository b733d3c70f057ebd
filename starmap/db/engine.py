"""Engines and sessions from any SQLAlchemy URL; SQLite gets the settings a multi-process app needs."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000
# What a wait for another writer's lock ends with: SQLite's SQLITE_BUSY / SQLITE_LOCKED messages and
# PostgreSQL's lock_not_available (the SQLSTATE of an expired lock_timeout).
SQLITE_LOCKED_MESSAGES = ("database is locked", "database table is locked")
POSTGRES_LOCK_NOT_AVAILABLE = "55P03"


def make_engine(url: str | URL, *, echo: bool = False, lock_timeout_ms: int | None = None) -> Engine:
    """An engine for `url`. For a SQLite file, its folder is created and every connection runs
    in WAL mode (readers never block the writer) with foreign keys enforced and a busy timeout.

    `lock_timeout_ms` bounds how long a statement waits for another writer's lock (SQLite's busy
    timeout, PostgreSQL's lock_timeout) before failing as `is_lock_timeout`; without it SQLite waits
    10 s and PostgreSQL as long as it takes, which suits batch writers but not a web request."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        connect_args = {}
        if lock_timeout_ms is not None and url.get_backend_name() == "postgresql":
            connect_args["options"] = f"-c lock_timeout={lock_timeout_ms}"
        return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo)
    busy_timeout_ms = SQLITE_BUSY_TIMEOUT_MS if lock_timeout_ms is None else lock_timeout_ms
    event.listen(engine, "connect", partial(_configure_sqlite_connection, busy_timeout_ms=busy_timeout_ms))
    return engine


def is_lock_timeout(error: DBAPIError) -> bool:
    """Whether `error` is a lock wait that expired (another process holds the write lock), not a fault."""
    orig = error.orig
    if getattr(orig, "sqlstate", None) == POSTGRES_LOCK_NOT_AVAILABLE:  # psycopg 3
        return True
    if getattr(orig, "pgcode", None) == POSTGRES_LOCK_NOT_AVAILABLE:  # psycopg2
        return True
    return isinstance(orig, sqlite3.OperationalError) and str(orig).startswith(SQLITE_LOCKED_MESSAGES)


def _configure_sqlite_connection(dbapi_connection, _connection_record, *, busy_timeout_ms: int) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
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
