"""Waking idle workers when tasks are queued, instead of letting them sleep a full poll.

An idle worker waits on a ``Wakeup`` rather than sleeping blindly; whoever queues tasks
pokes every waiting worker:

* **PostgreSQL**: ``NOTIFY datasync_tasks`` runs inside the transaction that inserts the
  tasks (``notify_in``), so PostgreSQL delivers it only at commit and a woken worker finds
  the tasks committed. Each worker process holds one extra connection that ``LISTEN``s;
  when it breaks (a restart, a network blip) it reconnects with backoff and wakes the
  worker once, since a notification may have been missed meanwhile.
* **SQLite** (one host): each waiting process owns a FIFO in ``<database>.wake/``; after the
  commit the inserter writes one byte to each (``poke_fifos``), non-blocking and best
  effort: an error never fails the insert, a FIFO without a reader (its worker died) is
  removed.

Nothing relies on the notification alone: tasks also become claimable when a lease
expires, a retry comes due or a site pause ends, which nobody announces. The worker's
wait is therefore bounded by its fallback poll (``WorkerOptions.idle_sleep``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import is_postgresql

__all__ = [
    "CHANNEL",
    "Wakeup",
    "fifo_dir",
    "notify_in",
    "poke_fifos",
]

log = logging.getLogger(__name__)
CHANNEL = "datasync_tasks"
_NOTIFY = sa.text(f"NOTIFY {CHANNEL}")
# How often a waiting listener looks up from its socket or FIFO (to notice close());
# waiting on a socket costs no query.
_TICK = 0.2
# How long a stop request may go unnoticed by a waiting worker.
STOP_TICK = 0.25
_RECONNECT_MAX = 30.0


def fifo_dir(engine: Engine) -> Path | None:
    """Where a SQLite database's waiting workers keep their FIFOs (None: in-memory)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database).expanduser().absolute().with_name(Path(database).name + ".wake")


def notify_in(conn: Connection) -> None:
    """PostgreSQL: queue the wake-up in the current transaction (sent at its commit)."""
    conn.execute(_NOTIFY)


def poke_fifos(directory: Path | None) -> None:
    """SQLite: wake every worker waiting on a FIFO in ``directory``. Never raises."""
    if directory is None:
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return  # no worker ever waited here
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nobody reads it: its worker is gone
                with suppress(OSError):
                    path.unlink()
            continue
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):  # never write into a stray file
                os.write(fd, b"\0")
        except OSError:  # full (EAGAIN): a wake-up is already pending there
            pass
        finally:
            os.close(fd)


class Stoppable(Protocol):
    def is_set(self) -> bool: ...


class Wakeup:
    """One process's wake-up: a listener thread that sets ``_poked`` (or ``poke()``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._poked = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._fifo: Path | None = None
        self._fds: tuple[int, int] | None = None

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> Wakeup:
        """Begin listening (before the first claim, so no wake-up is lost in between)."""
        if is_postgresql(self._engine):
            target = self._listen_pg
            ready = threading.Event()
            self._thread = threading.Thread(
                target=target, args=(ready,), name="datasync-wakeup", daemon=True
            )
            self._thread.start()
            ready.wait(10)  # LISTEN is in place (or its first attempt failed)
            return self
        directory = fifo_dir(self._engine)
        if directory is None:
            return self  # in-memory database: one process, the poll alone
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.mkfifo(path, 0o600)
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            # Our own writer keeps the FIFO from reporting EOF when pokers close theirs.
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            log.warning("no wake-up FIFO in %s; polling only", directory, exc_info=True)
            return self
        self._fifo, self._fds = path, (reader, writer)
        self._thread = threading.Thread(
            target=self._listen_fifo, args=(reader,), name="datasync-wakeup", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._fds is not None:
            with suppress(OSError):
                os.write(self._fds[1], b"\0")  # wake the listener so it sees _closing
        if self._thread is not None:
            self._thread.join(_TICK + 5)
        if self._fifo is not None:
            with suppress(OSError):
                self._fifo.unlink()
        if self._fds is not None:
            for fd in self._fds:
                with suppress(OSError):
                    os.close(fd)
            self._fds = None

    # -- waiting ---------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake this process's waiter (a task of its own finished, for instance)."""
        self._poked.set()

    def wait(self, stop: Stoppable, timeout: float) -> bool:
        """Wait until poked (True), ``stop`` is set or ``timeout`` passes (False); ``stop``
        is looked at every ``STOP_TICK``."""
        left = timeout
        while left > 0 and not stop.is_set():
            step = min(left, STOP_TICK)
            if self._poked.wait(step):
                self._poked.clear()
                return True
            left -= step
        return False

    # -- listeners -------------------------------------------------------------------------

    def _listen_fifo(self, reader: int) -> None:
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select([reader], [], [], _TICK)
                if not readable:
                    continue
                while os.read(reader, 4096):  # drain: one wake-up for any number of pokes
                    pass
            except BlockingIOError:
                pass  # drained
            except OSError:
                log.warning("wake-up FIFO failed; polling only", exc_info=True)
                return
            if not self._closing.is_set():
                self._poked.set()

    def _listen_pg(self, ready: threading.Event) -> None:
        import psycopg

        url = self._engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        delay = 0.5
        while not self._closing.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    ready.set()
                    delay = 0.5
                    while not self._closing.is_set():
                        for _ in conn.notifies(timeout=_TICK, stop_after=1):
                            self._poked.set()
            except psycopg.Error:
                ready.set()
                if self._closing.is_set():
                    return
                log.warning("wake-up listener lost PostgreSQL; reconnecting", exc_info=True)
                # A notification may have been missed: claim once to find out.
                self._poked.set()
                self._closing.wait(delay)
                delay = min(_RECONNECT_MAX, delay * 2)
