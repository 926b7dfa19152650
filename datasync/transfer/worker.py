"""Worker processes: claim tasks, execute them, complete or fail them, under leases.

``run_worker(settings, processes=N)`` spawns N OS processes (``multiprocessing`` "spawn":
nothing inherited but the settings; each builds its own engine, backends and pools through
``bootstrap``). Each process runs one ``WorkerLoop``:

* each turn, one transaction (``TaskStates.complete_and_claim``) completes every task that
  finished since the last turn, with the bytes it moved (group commit), and claims up to
  ``task_slots`` free slots' worth of tasks -> run each in the task pool (the executor fans
  its parts out to the bounded I/O pool, sharing one ``BufferPool``); a task that raised
  is ``fail``ed with the error at once (the queue decides between retry and permanent
  failure);
* with nothing to claim, wait on the ``Wakeup`` (tasks queued anywhere, or one of ours
  finished) or, at most, the fallback poll ``idle_sleep``;
* a heartbeat thread extends the leases of running tasks every ``lease_seconds / 3``; a
  lease found lost (taken over after a stall) cancels the task, so it stops writing;
* the process's row in ``workers`` (``datasync.observe.workers``) is written when the loop
  starts, refreshed by the same thread every ``WORKER_BEAT_SECONDS`` (or more often) and
  deleted when the loop ends, so others can tell a running task from a dead worker's;
* SIGTERM (or ``stop_event``): stop claiming, let running tasks finish for ``grace``
  seconds, then cancel the rest and hand them back (a retryable failure);
* SIGKILL at any instant is safe by design: leases expire, the next claim takes the task
  over, and chunk tasks resume from the parts recorded in the chunk map (invariant 4).

``once=True`` returns when nothing is left to do: no task queued or leased (of the given
placements, or at all) and nothing running. A lease held by a dead worker counts as "left
to do", so the loop waits for it to expire and takes it over.

Processes (spawning, signals, supervision) live in ``datasync.transfer.supervisor``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.engine import DB_UNAVAILABLE
from datasync.db.transfer_tables import Task
from datasync.errors import DatasyncError
from datasync.models import TaskState
from datasync.observe.workers import WORKER_BEAT_SECONDS, WorkerLiveness
from datasync.transfer.exec import Executor, ReplanNeeded
from datasync.transfer.failpoints import failpoint
from datasync.transfer.state import ClaimedTask, TaskStates
from datasync.transfer.wakeup import Wakeup

__all__ = [
    "REAP_EVERY_SECONDS",
    "WorkerLoop",
    "WorkerOptions",
    "WorkerParts",
    "WorkerStats",
    "pending_tasks",
]

log = logging.getLogger(__name__)
MIB = 1024 * 1024
# How often expired last-attempt leases are reaped (by `datasync up` and by every worker).
REAP_EVERY_SECONDS = 30


class StopSignal(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Knobs of one worker process."""

    task_slots: int = 4  # tasks in flight per process
    io_threads: int = 8  # bounded I/O pool shared by the process's tasks
    buffer_budget: int = 512 * MIB  # at least 2 chunks; raised to that when smaller
    lease_seconds: float = 60.0
    # Fallback poll: the longest pause between empty claims. New tasks wake an idle worker
    # at once (``datasync.transfer.wakeup``); this bounds what nobody announces (expired
    # leases, retries coming due).
    idle_sleep: float = 0.5
    grace: float = 30.0  # seconds running tasks get to finish on SIGTERM
    queue_backoff_base: float = 2.0  # TaskQueue retry backoff (tests use 0)
    # The sites this worker can reach (None: all). It claims only tasks whose source and
    # destination are among them: a POSIX site is mounted on its own hosts only.
    sites: frozenset[str] | None = None
    # First pause after a full destination (NoSpace); None: 15 x queue_backoff_base (30 s).
    space_backoff_base: float | None = None


@dataclass(slots=True)
class WorkerStats:
    completed: int = 0
    failed: int = 0
    bytes_moved: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def pending_tasks(
    engine: Engine, placements: Sequence[int] | None, sites: Collection[str] | None = None
) -> int:
    """Tasks still queued or leased (of ``placements``, or all; within reach of ``sites``)."""
    query = sa.select(sa.func.count()).where(
        col(Task.state).in_((TaskState.QUEUED, TaskState.LEASED))
    )
    if placements is not None:
        query = query.where(col(Task.placement_id).in_(list(placements)))
    if sites is not None:
        query = query.where(
            col(Task.dst_site).in_(list(sites)),
            sa.or_(col(Task.src_site).is_(None), col(Task.src_site).in_(list(sites))),
        )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@dataclass(frozen=True, slots=True)
class WorkerParts:
    """What one worker process runs with; built by ``datasync.bootstrap`` (``App.worker``)."""

    engine: Engine
    tasks: TaskStates
    executor: Executor
    # Re-plan a placement whose blobs were found missing or damaged (``ReplanNeeded``).
    replan: Callable[[int, str], object]
    # Periodic chores every worker runs too (reap dead leases, keep deadlines current), so
    # a `serve` + `worker` deployment without `datasync up` still does them.
    chores: tuple[Callable[[], object], ...]
    liveness: WorkerLiveness  # this process's row in ``workers``
    # Opens the sites this worker serves (SDK imports, clients) before its first claim.
    warm: Callable[[Collection[str] | None], None]
    closers: tuple[Callable[[], None], ...]  # pools, backends, limits: closed in order


class WorkerLoop:
    """One process's claim -> execute -> complete loop (thread-safe parts inside)."""

    def __init__(self, parts: WorkerParts, options: WorkerOptions) -> None:
        self.parts = parts
        self.engine = parts.engine
        self.options = options
        self.owner = _owner()
        self.queue = parts.tasks
        self.executor = parts.executor
        self.tasks = cf.ThreadPoolExecutor(options.task_slots, thread_name_prefix="datasync-task")
        self.stats = WorkerStats()
        self._running: dict[int, tuple[cf.Future[int], threading.Event, ClaimedTask]] = {}
        # Finished, not yet recorded complete: task id -> (task, bytes moved).
        self._finished: dict[int, tuple[ClaimedTask, int]] = {}
        self._lock = threading.Lock()
        self._beat_stop = threading.Event()

    # -- heartbeat ----------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        period = max(0.2, self.options.lease_seconds / 3)
        tick = min(period, WORKER_BEAT_SECONDS)
        next_lease = time.monotonic() + period
        next_reap = 0.0
        while not self._beat_stop.wait(tick):
            with self._lock:
                running = len(self._running)
            self.parts.liveness.beat(self.owner, running)
            if time.monotonic() < next_lease:
                continue
            next_lease = time.monotonic() + period
            # Every worker also reaps dead leases, so a `serve` + `worker` deployment
            # without `datasync up` still fails tasks whose last attempt died.
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + REAP_EVERY_SECONDS
                for chore in self.parts.chores:
                    try:
                        chore()
                    except DB_UNAVAILABLE:
                        log.warning("periodic chore %s failed", chore, exc_info=True)
            with self._lock:
                ids = list(self._running)
            if not ids:
                continue
            try:
                owned = self.queue.heartbeat(self.owner, ids, self.options.lease_seconds)
            except DB_UNAVAILABLE:  # the database blipped: try again next period
                log.warning("heartbeat failed", exc_info=True)
                continue
            with self._lock:
                for task_id in set(ids) - owned:
                    entry = self._running.get(task_id)
                    if entry is not None:
                        log.warning("lease of task %s lost; cancelling it", task_id)
                        entry[1].set()

    # -- finishing tasks ----------------------------------------------------------------------

    def _finish(self, task_id: int) -> None:
        with self._lock:
            fut, _cancel, task = self._running.pop(task_id)
        try:
            moved = fut.result()
        except ReplanNeeded as exc:
            # The re-plan replaces this task (and every other of the placement).
            log.info("task %s: %s", task.id, exc)
            try:
                self.parts.replan(task.placement_id, exc.message)
            except DB_UNAVAILABLE:  # the lease expires; the next attempt finds it again
                log.warning("could not re-plan placement %s", task.placement_id, exc_info=True)
            return
        except Exception as exc:
            if isinstance(exc, DatasyncError):
                log.info("task %s (%s) failed: %s: %s", task.id, task.kind, type(exc).__name__, exc)
            else:  # a bug or an untranslated error: keep the traceback
                log.warning("task %s (%s) failed", task.id, task.kind, exc_info=exc)
            try:
                self.queue.fail(self.owner, task.id, exc)
            except DB_UNAVAILABLE:  # the lease expires and the task is retried
                log.warning("could not record the failure of task %s", task.id, exc_info=True)
            self.stats.failed += 1
            return
        self._finished[task.id] = (task, moved)  # completed at the next turn

    def _turn(self, free: int) -> list[ClaimedTask]:
        """Complete every task that finished since the last turn and claim up to ``free``
        more, in one transaction (group commit). Completions the database could not take
        are kept for the next turn; should this process die first, their leases expire
        and the tasks run again, a no-op (invariant 5)."""
        finished = dict(self._finished)
        if free <= 0 and not finished:
            return []
        moved = {task_id: m for task_id, (_task, m) in finished.items()}
        if finished:
            failpoint("before_complete")
        try:
            done, claimed = self.queue.complete_and_claim(
                self.owner, moved, free, self.options.lease_seconds, self.options.sites
            )
        except DB_UNAVAILABLE:  # database restart or network blip: try again shortly
            log.warning("claim or complete failed; retrying", exc_info=True)
            return []
        for task_id, (task, m) in finished.items():
            del self._finished[task_id]
            # Not done when the lease was lost: the new owner's run is a no-op.
            if task_id in done:
                self.stats.completed += 1
                self.stats.bytes_moved += m
                self.stats.by_kind[task.kind] = self.stats.by_kind.get(task.kind, 0) + 1
        return claimed

    def _reap(self, timeout: float) -> None:
        with self._lock:
            futures = {entry[0]: tid for tid, entry in self._running.items()}
        if not futures:
            return
        done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            self._finish(futures[fut])

    # -- main loop ----------------------------------------------------------------------------

    def run(
        self,
        stop: StopSignal,
        *,
        once: bool = False,
        placements: Sequence[int] | None = None,
    ) -> WorkerStats:
        self.parts.liveness.register(self.owner)
        beat = threading.Thread(target=self._heartbeat, name="datasync-heartbeat", daemon=True)
        beat.start()
        # Listen before the first claim, so tasks queued in between still wake us.
        wakeup = Wakeup(self.engine).start()
        try:
            if not once:  # a daemon: its first task must not pay for SDK imports and clients
                self.parts.warm(self.options.sites)
            while not stop.is_set():
                self._reap(0)  # tasks that finished meanwhile: completed by this turn
                with self._lock:
                    free = self.options.task_slots - len(self._running)
                claimed = self._turn(free)
                for task in claimed:
                    cancel = threading.Event()
                    fut = self.tasks.submit(self.executor.execute, task, cancel)
                    fut.add_done_callback(lambda _f: wakeup.poke())  # a slot is free again
                    with self._lock:
                        self._running[task.id] = (fut, cancel, task)
                if claimed:
                    continue
                with self._lock:
                    running = len(self._running)
                if not running and not self._finished and once and self._idle(placements):
                    break
                # Until tasks are queued (a notification), one of ours finishes, or the
                # fallback poll: leases expire and retries come due unannounced.
                wakeup.wait(stop, self.options.idle_sleep)
            self._drain()
        finally:
            wakeup.close()
            self._beat_stop.set()
            beat.join(5)
            self.parts.liveness.deregister(self.owner)
        return self.stats

    def _idle(self, placements: Sequence[int] | None) -> bool:
        try:
            return pending_tasks(self.engine, placements, self.options.sites) == 0
        except DB_UNAVAILABLE:
            log.warning("cannot count pending tasks; retrying", exc_info=True)
            return False

    def _drain(self) -> None:
        """Stop: let running tasks finish for ``grace`` seconds, then cancel the rest."""
        deadline = time.monotonic() + self.options.grace
        try:
            while True:
                self._turn(0)  # complete what finished, claim nothing
                with self._lock:
                    if not self._running:
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._reap(min(remaining, 1.0))
            with self._lock:
                for _fut, cancel, _task in self._running.values():
                    cancel.set()  # parts stop at their next boundary; _finish hands them back
            while True:
                with self._lock:
                    if not self._running:
                        return
                self._reap(1.0)
        finally:
            self._turn(0)
            if self._finished:
                log.warning(
                    "%d finished tasks not recorded complete; their leases will expire",
                    len(self._finished),
                )

    def close(self) -> None:
        self.tasks.shutdown(wait=True)
        for close in self.parts.closers:
            close()
