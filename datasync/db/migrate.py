"""Bring a database to the newest schema by running Alembic programmatically.

Called by ``bootstrap`` on every start; at head it is one cheap query and Alembic is not
even imported (with mako and pygments it cost a short command such as ``datasync
register`` 0.15 CPU s): ``script_head`` reads the ``revision``/``down_revision`` lines of
the migration scripts as text, and only a database whose ``alembic_version`` holds exactly
that one revision counts as at head. Revision lines in another form, more than one head,
or any other stored revision go through Alembic, which decides. The migration
scripts live in ``datasync/db/migrations`` and ship inside the package, so an installed
datasync needs no alembic.ini. On SQLite the upgrade runs under ``BEGIN IMMEDIATE`` so two
processes starting at once do not race; on PostgreSQL an advisory lock serialises them.

SQLite cannot alter a constraint, so some migrations rebuild a table (Alembic's batch
mode: copy, drop, rename). With foreign keys on, that DROP would cascade into the rows
that reference the table (every task of every placement); so foreign keys are off while
migrations run on SQLite, and ``foreign_key_check`` must come back clean before commit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import SQLITE_IMMEDIATE, is_postgresql, is_sqlite

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "MIGRATIONS_DIR",
    "current_revision",
    "head_revision",
    "run_migrations",
    "script_head",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any constant shared by all datasync processes; "datasync" in ASCII.
_PG_LOCK_KEY = 0x6461746173796E63
# ``revision: str = "0006"`` / ``down_revision: str | None = "0005"`` (or ``= None``), as
# ``script.py.mako`` writes them.
_REVISION_RE = re.compile(r"^revision\s*(?::[^=\n]*)?=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_DOWN_RE = re.compile(
    r"^down_revision\s*(?::[^=\n]*)?=\s*(?:None|[\"']([^\"']+)[\"'])\s*$", re.MULTILINE
)


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


@cache
def script_head() -> str | None:
    """The one head revision of the migration scripts, read as text without Alembic;
    None when any script's revision lines are not in the simple form (several down
    revisions, a computed value) or there is not exactly one head: Alembic decides then."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        rev, down = _REVISION_RE.findall(text), _DOWN_RE.findall(text)
        if len(rev) != 1 or len(down) != 1:
            return None
        revisions.add(rev[0])
        parents.add(down[0])  # "" for the root (None)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _at_head(engine: Engine) -> bool:
    """The database stores exactly ``script_head()`` (one plain query, no Alembic)."""
    head = script_head()
    if head is None:
        return False
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return False
        stored = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        return list(stored) == [head]


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration in one transaction (nothing if already at head)."""
    if _at_head(engine) or current_revision(engine) == head_revision():
        return
    from alembic import command

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
