"""Bring a database to the newest schema by running Alembic programmatically.

Called by ``bootstrap`` on every start; at head it is one cheap query. The migration
scripts live in ``datasync/db/migrations`` and ship inside the package, so an installed
datasync needs no alembic.ini. On SQLite the upgrade runs under ``BEGIN IMMEDIATE`` so two
processes starting at once do not race; on PostgreSQL an advisory lock serialises them.

SQLite cannot alter a constraint, so some migrations rebuild a table (Alembic's batch
mode: copy, drop, rename). With foreign keys on, that DROP would cascade into the rows
that reference the table (every task of every placement); so foreign keys are off while
migrations run on SQLite, and ``foreign_key_check`` must come back clean before commit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import SQLITE_IMMEDIATE, is_postgresql, is_sqlite

__all__ = [
    "MIGRATIONS_DIR",
    "current_revision",
    "head_revision",
    "run_migrations",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any constant shared by all datasync processes; "datasync" in ASCII.
_PG_LOCK_KEY = 0x6461746173796E63


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration in one transaction (nothing if already at head)."""
    if current_revision(engine) == head_revision():
        return
    run_migrations(engine, lambda cfg: command.upgrade(cfg, "head"))


def run_migrations(engine: Engine, step: Callable[[Config], None]) -> None:
    """Run an Alembic command (``step``) in one write transaction, safely on both engines."""
    cfg = _config()
    with engine.connect() as conn:
        sqlite = is_sqlite(conn)
        if sqlite:  # before BEGIN: the pragma is a no-op inside a transaction
            _sqlite_foreign_keys(conn, on=False)
        try:
            conn.execution_options(**SQLITE_IMMEDIATE)
            with conn.begin():
                if is_postgresql(conn):
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
                cfg.attributes["connection"] = conn
                step(cfg)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                _sqlite_foreign_keys(conn, on=True)


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> None:
    # On the DBAPI connection, which pysqlite runs in autocommit mode (datasync.db.engine),
    # so no BEGIN is pending when the pragma runs.
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
