"""Worker liveness: the ``workers`` table, one row per running worker process.

The only writer of ``workers``. A worker loop ``register``s its row when it starts,
``beat``s it (``last_seen``, ``tasks_running``) every ``WORKER_BEAT_SECONDS`` from its
heartbeat thread, and ``deregister``s it on a clean exit; a killed worker leaves a row
whose ``last_seen`` ages. A worker is *live* when it beat within ``LIVE_SECONDS``, so
``status``, the dashboard and ``/metrics`` tell a running task from one whose worker died
long before its lease expires. Rows silent for ``PRUNE_AFTER`` are deleted when a worker
starts. Times come from the database clock on PostgreSQL (many hosts, one clock).

This is process bookkeeping, not replication state: it never touches placements, tasks or
replicas.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from datasync.db.engine import DB_UNAVAILABLE, is_postgresql, write_transaction
from datasync.db.ops_tables import WorkerRow

__all__ = [
    "LIVE_SECONDS",
    "PRUNE_AFTER",
    "WORKER_BEAT_SECONDS",
    "WorkerLiveness",
    "db_now",
    "live_since",
]

log = logging.getLogger(__name__)

WORKER_BEAT_SECONDS = 5.0
LIVE_SECONDS = 20.0  # four beats missed: the worker is gone (or hung)
PRUNE_AFTER = timedelta(hours=1)


def db_now(conn: Connection) -> datetime:
    """The database's clock on PostgreSQL, this host's UTC clock on SQLite."""
    if is_postgresql(conn):
        value = conn.execute(sa.text("SELECT now()")).scalar_one()
        assert isinstance(value, datetime)
        return value.astimezone(UTC)
    return datetime.now(UTC)


def live_since(now: datetime) -> datetime:
    """Workers whose ``last_seen`` is at or after this are live."""
    return now - timedelta(seconds=LIVE_SECONDS)


class WorkerLiveness:
    """Registers, refreshes and removes one process's worker rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.host = socket.gethostname()

    def register(self, owner: str) -> None:
        """Insert (or revive) ``owner``'s row and prune long-dead ones. Never raises for a
        database that does not answer: the next beat writes the row."""
        try:
            with write_transaction(self.engine) as conn:
                now = db_now(conn)
                conn.execute(
                    sa.delete(WorkerRow).where(col(WorkerRow.last_seen) < now - PRUNE_AFTER)
                )
                self._upsert(conn, owner, now, 0, started=True)
        except DB_UNAVAILABLE:
            log.warning("cannot register worker %s; will retry", owner, exc_info=True)

    def beat(self, owner: str, tasks_running: int) -> None:
        try:
            with write_transaction(self.engine) as conn:
                self._upsert(conn, owner, db_now(conn), tasks_running, started=False)
        except DB_UNAVAILABLE:
            log.warning("worker heartbeat of %s failed", owner, exc_info=True)

    def deregister(self, owner: str) -> None:
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(sa.delete(WorkerRow).where(col(WorkerRow.owner) == owner))
        except DB_UNAVAILABLE:  # the row goes stale and is pruned later
            log.warning("cannot deregister worker %s", owner, exc_info=True)

    def _upsert(
        self, conn: Connection, owner: str, now: datetime, running: int, *, started: bool
    ) -> None:
        insert: Any = postgresql.insert if is_postgresql(conn) else sqlite.insert
        values = {
            "owner": owner,
            "host": self.host,
            "pid": os.getpid(),
            "started_at": now,
            "last_seen": now,
            "tasks_running": running,
        }
        update = {"last_seen": now, "tasks_running": running}
        if started:
            update["started_at"] = now
        stmt = insert(WorkerRow).values(**values)
        conn.execute(stmt.on_conflict_do_update(index_elements=["owner"], set_=update))
