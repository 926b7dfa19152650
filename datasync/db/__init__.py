"""Database layer: engines, SQLModel tables and Alembic migrations.

Import ``datasync.db.engine`` / ``datasync.db.migrate`` directly; this package imports
nothing heavy and connects to nothing at import time.
"""

from __future__ import annotations

from datasync.db.engine import create_engine, write_transaction
from datasync.db.migrate import upgrade_to_head

__all__ = ["create_engine", "upgrade_to_head", "write_transaction"]
