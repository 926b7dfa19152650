"""Bring a database to the newest schema by running Alembic programmatically.

Called by ``bootstrap`` on every start; at head it is one cheap query. The migration
scripts live in ``datasync/db/migrations`` and ship inside the package, so an installed
datasync needs no alembic.ini. On SQLite the upgrade runs under ``BEGIN IMMEDIATE`` so two
processes starting at once do not race; on PostgreSQL an advisory lock serialises them.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from datasync.db.engine import is_postgresql, write_transaction

__all__ = ["MIGRATIONS_DIR", "current_revision", "head_revision", "upgrade_to_head"]

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
    cfg = _config()
    with write_transaction(engine) as conn:
        if is_postgresql(conn):
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
