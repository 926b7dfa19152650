"""Worker processes: spawn N ``WorkerLoop`` processes, keep them tied to their parent.

``run_worker(settings, processes=N)`` migrates the database once, then runs a
``WorkerPool``: N OS processes (``multiprocessing`` "spawn": nothing inherited but the
settings; each builds its own engine, backends and pools through ``bootstrap``).
``run_until_idle`` is the test and demo entry: the same loop, in this process
(``processes=0``) or in N spawned processes, until the placements have no pending task.

Invariants:

* **A worker process never outlives its parent.** At start a child asks Linux for SIGTERM
  when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that its parent is still
  the process that spawned it (the parent may have died before the request). Everywhere,
  it also watches a pipe whose only writer is the parent: the kernel closes that end when
  the parent dies, whatever killed it. Any of the three sets the child's stop signal: it
  claims nothing more, and stops as on SIGTERM (running tasks get ``grace`` seconds, then
  are handed back).
* **The parent exits after its children.** SIGTERM or SIGINT (or ``stop_event``) makes the
  parent send SIGTERM to every child and wait ``grace + STOP_MARGIN_SECONDS``; children
  still alive then are SIGKILLed (their leases expire: invariant 4) and reaped.

Children log and count like their parent: the parent's log setup and host metrics
directory travel with the spawn arguments (``ChildObservability``) and are applied before
the child builds anything (prometheus_client must see the directory first).

Linux sends the death signal when the *thread* that spawned the child ends, so a pool is
started and stopped by the same thread, which outlives it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType, TracebackType

from datasync.config import Settings
from datasync.observe import ChildObservability
from datasync.transfer.worker import (
    StopSignal,
    WorkerOptions,
    WorkerStats,
    pending_tasks,
)

__all__ = [
    "ParentWatch",
    "WorkerOptions",
    "WorkerPool",
    "WorkerStats",
    "run_until_idle",
    "run_worker",
    "stop_on_signals",
]

log = logging.getLogger(__name__)

STOP_MARGIN_SECONDS = 15.0  # past a child's grace: cancelled parts end, tasks are handed back
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ----------------------------------------------------------------------------- child side


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0
    except (OSError, AttributeError):  # no prctl symbol: the parent pipe still works
        failed = True
    if failed:
        log.warning("cannot arm PR_SET_PDEATHSIG; the parent pipe alone watches the parent")


class ParentWatch:
    """A stop signal that is set when the parent process is gone, or by ``set()``.

    ``pipe`` is the read end of a pipe whose only writer is the parent, so it reports EOF
    when the parent dies. ``parent_pid`` is the pid of the process that spawned this one:
    if ``os.getppid()`` already differs, the parent died before the watch began.
    """

    def __init__(self, pipe: Connection, parent_pid: int) -> None:
        self._stop = threading.Event()
        if os.getppid() != parent_pid:
            log.warning("parent process %s is gone; not starting", parent_pid)
            self._stop.set()
            return
        threading.Thread(
            target=self._watch, args=(pipe,), name="datasync-parent-watch", daemon=True
        ).start()

    def _watch(self, pipe: Connection) -> None:
        # Readable only at EOF (the parent never writes); a broken pipe means the same.
        with suppress(OSError):
            wait([pipe])
        if not self._stop.is_set():
            log.warning("parent process is gone; stopping")
        self._stop.set()

    def set(self) -> None:
        self._stop.set()

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)


def _process_main(
    settings_json: str,
    options: WorkerOptions,
    once: bool,
    placements: Sequence[int] | None,
    parent_pipe: Connection,
    parent_pid: int,
    observability: ChildObservability,
) -> None:
    """Entry point of a spawned worker process."""
    # Until the handlers below are installed, SIGTERM kills this process outright: it has
    # claimed nothing yet.
    _die_with_parent()
    stop = ParentWatch(parent_pipe, parent_pid)

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if stop.is_set():
        return
    observability.apply()  # logs and the metrics directory, before any metric exists
    from datasync.bootstrap import bootstrap

    # The parent migrated before spawning (``run_worker``, ``datasync up``): no Alembic here.
    app = bootstrap(Settings.model_validate_json(settings_json), migrate=False)
    loop = app.worker(options)
    try:
        loop.run(stop, once=once, placements=placements)
    finally:
        loop.close()
        app.close()


# ---------------------------------------------------------------------------- parent side


class WorkerPool:
    """``processes`` spawned worker processes that die with this one (module docstring).

    ``start()`` spawns them; ``stop()`` (also on leaving a ``with`` block) stops and reaps
    every one, escalating to SIGKILL after ``grace + STOP_MARGIN_SECONDS``. The database
    must be migrated before ``start()``.
    """

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        options: WorkerOptions | None = None,
        once: bool = False,
        placements: Sequence[int] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"a worker pool needs at least one process, not {processes}")
        self.options = options or WorkerOptions()
        ctx = multiprocessing.get_context("spawn")
        # The parent keeps the only write end: spawned children inherit just the read end.
        self._pipe_r, self._pipe_w = ctx.Pipe(duplex=False)
        args = (
            settings.model_dump_json(),
            self.options,
            once,
            placements,
            self._pipe_r,
            os.getpid(),
            ChildObservability.of_this_process(),
        )
        self.children: list[BaseProcess] = [
            ctx.Process(target=_process_main, args=args, name=f"datasync-worker-{i}")
            for i in range(processes)
        ]
        self._reported: set[int | None] = set()

    def start(self) -> None:
        for child in self.children:
            child.start()

    def alive(self) -> list[BaseProcess]:
        return [c for c in self.children if c.is_alive()]

    def wait(self, until: Callable[[], bool], poll: float = 0.2) -> None:
        """Return when every child has exited, or as soon as ``until()`` is true.

        A child that fails meanwhile is logged, not restarted: the others carry on."""
        while not until():
            self._report_failures(expected=())
            alive = self.alive()
            if not alive:
                return
            wait([c.sentinel for c in alive], timeout=poll)

    def _report_failures(self, expected: tuple[int, ...]) -> None:
        for child in self.children:
            code = child.exitcode
            if code not in (None, 0, *expected) and child.pid not in self._reported:
                self._reported.add(child.pid)
                log.warning("worker process %s exited with code %s", child.pid, code)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every child, wait for them, SIGKILL the ones still there, reap all.

        ``timeout``: seconds before SIGKILL, by default ``grace + STOP_MARGIN_SECONDS``."""
        for child in self.alive():
            child.terminate()
        if timeout is None:
            timeout = self.options.grace + STOP_MARGIN_SECONDS
        deadline = time.monotonic() + timeout
        while (alive := self.alive()) and (left := deadline - time.monotonic()) > 0:
            wait([c.sentinel for c in alive], timeout=left)
        for child in self.alive():
            log.warning("worker process %s did not stop in time; killing it", child.pid)
            child.kill()
        for child in self.children:
            if child.pid is not None:
                child.join()
        # Killed before its handler was installed (SIGTERM), or by the escalation (SIGKILL).
        self._report_failures(expected=(-signal.SIGTERM, -signal.SIGKILL))
        self._pipe_r.close()
        self._pipe_w.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def stop_on_signals(on_signal: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Inside the block, SIGTERM and SIGINT set the yielded event (and call ``on_signal``)
    instead of ending the process, so the caller can stop its children first.

    Only the main thread can own signals; elsewhere the event is never set by a signal.
    """
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stopping.set()
        if on_signal is not None:
            on_signal()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_worker(
    settings: Settings,
    *,
    processes: int = 1,
    once: bool = False,
    stop_event: StopSignal | None = None,
    options: WorkerOptions | None = None,
    placements: Sequence[int] | None = None,
) -> WorkerStats:
    """Run worker processes until ``stop_event``/SIGTERM/SIGINT (or, with ``once``, idle).

    ``processes=0`` runs the loop in this process (tests, tiny hosts) and leaves signals
    alone. Returns this process's stats (``processes=0``) or empty stats (children report
    nothing).
    """
    options = options or WorkerOptions()
    from datasync.bootstrap import bootstrap

    app = bootstrap(settings)  # migrate once here, so children never race the migration
    if processes <= 0:
        stop = stop_event or threading.Event()
        loop = app.worker(options)
        try:
            return loop.run(stop, once=once, placements=placements)
        finally:
            loop.close()
            app.close()
    app.close()
    pool = WorkerPool(settings, processes, options=options, once=once, placements=placements)
    with stop_on_signals() as stopping, pool:
        pool.start()
        pool.wait(lambda: stopping.is_set() or (stop_event is not None and stop_event.is_set()))
    return WorkerStats()


def run_until_idle(
    settings: Settings,
    placements: Iterable[int] | None = None,
    *,
    processes: int = 0,
    options: WorkerOptions | None = None,
    timeout: float = 300.0,
) -> WorkerStats:
    """Run workers until the placements have no queued or leased task left.

    Raises ``TimeoutError`` if tasks are still pending after ``timeout`` seconds."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.daemon = True
    timer.start()
    try:
        ids = None if placements is None else list(placements)
        stats = run_worker(
            settings,
            processes=processes,
            once=True,
            stop_event=stop,
            options=options,
            placements=ids,
        )
    finally:
        timer.cancel()
    if stop.is_set():
        from datasync.db.engine import create_engine

        engine = create_engine(settings.database_url)
        try:
            left = pending_tasks(engine, ids)
        finally:
            engine.dispose()
        if left:
            raise TimeoutError(f"{left} task(s) still pending after {timeout}s")
    return stats
