"""Database engines: SQLite (embedded default) and PostgreSQL (production), one code path.

SQLite connections get, on every connect: WAL journal (readers never block the writer),
``busy_timeout`` (writers wait instead of failing), ``foreign_keys=ON`` (cascades work) and
``synchronous=NORMAL`` (safe with WAL). pysqlite's own implicit transaction handling is
turned off and SQLAlchemy emits ``BEGIN`` itself, so a caller can ask for
``BEGIN IMMEDIATE`` (take the write lock up front, no read-to-write upgrade deadlock) with
``write_transaction``. PostgreSQL uses psycopg 3 and needs nothing special.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from datasync.errors import ConfigError

__all__ = [
    "DB_UNAVAILABLE",
    "SQLITE_IMMEDIATE",
    "create_engine",
    "is_postgresql",
    "is_sqlite",
    "write_transaction",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "datasync_sqlite_begin"
# What a database that is restarting or unreachable raises: worth retrying later. Other
# database errors (a SQL bug, a constraint) are not, and must not be retried forever.
DB_UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError)
# Execution options that make the next BEGIN on SQLite a BEGIN IMMEDIATE.
SQLITE_IMMEDIATE = {_BEGIN_OPTION: "IMMEDIATE"}


def create_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"bad database_url {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(parsed, **kwargs)
    raise ConfigError(f"unsupported database {backend!r}: use sqlite:/// or postgresql+psycopg://")


def is_sqlite(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "sqlite"


def is_postgresql(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that intends to write: ``BEGIN IMMEDIATE`` on SQLite, plain on PostgreSQL.

    Commits on success, rolls back on any exception.
    """
    with engine.connect() as conn:
        conn.execution_options(**SQLITE_IMMEDIATE)
        with conn.begin():
            yield conn


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN; pysqlite's legacy implicit BEGIN would
    # otherwise start transactions late and make BEGIN IMMEDIATE impossible.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
