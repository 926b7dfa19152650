"""The write transaction every transition runs in: one database transaction, then events.

Events collected during the transaction are emitted only after it committed, so a
subscriber never sees a rolled-back change. A transaction that made tasks claimable calls
``tasks_ready()``: idle workers are woken at its commit (``datasync.transfer.wakeup``), not
at their next poll. On PostgreSQL times come from the database
clock (many hosts, one clock); on SQLite (one host) from this host's UTC clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.ops_tables import PlacementHistory
from datasync.events import Event, EventBus
from datasync.transfer.wakeup import fifo_dir, notify_in, poke_fifos

__all__ = ["StateBase", "Txn", "as_utc", "row_id"]


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive UTC datetimes; make every datetime aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def row_id(value: int | None) -> int:
    """A primary key read back from the database (never NULL; typed optional by SQLModel)."""
    if value is None:
        raise ValueError("a row id was NULL")
    return int(value)


@dataclass(slots=True)
class Txn:
    """An open write transaction and the events it will emit after commit."""

    conn: Connection
    pg: bool
    events: list[Event] = field(default_factory=list)
    _now: datetime | None = None
    woke: bool = False  # tasks became claimable: wake idle workers after the commit

    @property
    def now(self) -> datetime:
        """The transaction's time (one value for every statement of the transaction)."""
        if self._now is None:
            if self.pg:
                value = self.conn.execute(sa.text("SELECT now()")).scalar_one()
                assert isinstance(value, datetime)
                self._now = value
            else:
                self._now = datetime.now(UTC)
        return self._now

    @property
    def clock(self) -> Any:
        """``now`` as SQL: PostgreSQL's ``now()`` is the same transaction time, without
        the round trip that reading it costs (hot paths write it, never read it)."""
        return sa.func.now() if self.pg else self.now

    def tasks_ready(self) -> None:
        """Wake idle workers when this transaction commits (once per transaction)."""
        if self.woke:
            return
        self.woke = True
        if self.pg:  # delivered by PostgreSQL at commit, never for a rollback
            notify_in(self.conn)

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def entered(self, placement_id: int, state: str, note: str | None = None) -> None:
        """Record that the placement entered ``state`` now (its history, for ``explain``)."""
        self.conn.execute(
            sa.insert(PlacementHistory).values(
                placement_id=placement_id, state=state, at=self.now, note=note
            )
        )


class StateBase:
    """Shared plumbing of the state owner's parts."""

    def __init__(self, engine: Engine, bus: EventBus) -> None:
        self.engine = engine
        self.bus = bus
        self.pg = is_postgresql(engine)
        self._fifos = fifo_dir(engine)

    @contextmanager
    def _write(self) -> Iterator[Txn]:
        with write_transaction(self.engine) as conn:
            txn = Txn(conn, self.pg)
            yield txn
        if txn.woke and not self.pg:
            poke_fifos(self._fifos)  # after the commit, so the woken claim sees the rows
        for event in txn.events:
            self.bus.emit(event)
