"""Database layer: engines, SQLModel tables and Alembic migrations.

Import ``datasync.db.engine`` / ``datasync.db.migrate`` directly; this package imports
nothing heavy and connects to nothing at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datasync.db.engine import create_engine, write_transaction

if TYPE_CHECKING:
    from datasync.db.migrate import upgrade_to_head

__all__ = ["create_engine", "upgrade_to_head", "write_transaction"]


def __getattr__(name: str) -> Any:
    # Alembic (and the migration scripts) load only when a migration is asked for: a
    # spawned worker process opens an already migrated database (``bootstrap``).
    if name == "upgrade_to_head":
        from datasync.db import migrate

        return migrate.upgrade_to_head
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
