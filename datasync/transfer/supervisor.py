"""Worker processes: spawn N ``WorkerLoop`` processes, stop them on SIGTERM, run until idle.

``run_worker(settings, processes=N)`` spawns N OS processes (``multiprocessing`` "spawn":
nothing inherited but the settings; each builds its own engine, backends and pools through
``bootstrap``). ``run_until_idle`` is the test and demo entry: the same loop, in this
process (``processes=0``) or in N spawned processes, until the placements have no pending
task.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from datasync.config import Settings
from datasync.transfer.worker import (
    StopSignal,
    WorkerOptions,
    WorkerStats,
    pending_tasks,
)

__all__ = ["WorkerOptions", "WorkerStats", "run_until_idle", "run_worker"]

log = logging.getLogger(__name__)


def _process_main(
    settings_json: str,
    options: WorkerOptions,
    once: bool,
    placements: Sequence[int] | None,
    stop: Any,
) -> None:
    """Entry point of a spawned worker process."""
    from datasync.bootstrap import bootstrap

    settings = Settings.model_validate_json(settings_json)
    local_stop = threading.Event()

    def on_term(_sig: int, _frame: object) -> None:
        local_stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    class _Either:
        def is_set(self) -> bool:
            return local_stop.is_set() or (stop is not None and stop.is_set())

        def wait(self, timeout: float | None = None) -> bool:
            return local_stop.wait(timeout) or self.is_set()

    app = bootstrap(settings)
    loop = app.worker(options)
    try:
        loop.run(_Either(), once=once, placements=placements)
    finally:
        loop.close()
        app.close()


def run_worker(
    settings: Settings,
    *,
    processes: int = 1,
    once: bool = False,
    stop_event: StopSignal | None = None,
    options: WorkerOptions | None = None,
    placements: Sequence[int] | None = None,
) -> WorkerStats:
    """Run worker processes until ``stop_event``/SIGTERM (or, with ``once``, until idle).

    ``processes=0`` runs the loop in this process (tests, ``datasync up`` on small hosts).
    Returns this process's stats (``processes=0``) or empty stats (children report nothing).
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
    ctx = multiprocessing.get_context("spawn")
    mp_stop = ctx.Event()
    children = [
        ctx.Process(
            target=_process_main,
            args=(settings.model_dump_json(), options, once, placements, mp_stop),
            name=f"datasync-worker-{i}",
        )
        for i in range(processes)
    ]
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()

    def on_term(_sig: int, _frame: object) -> None:
        mp_stop.set()

    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        for child in children:
            child.start()
        while any(c.is_alive() for c in children):
            if stop_event is not None and stop_event.is_set():
                mp_stop.set()
            for child in children:
                child.join(0.2)
    finally:
        mp_stop.set()
        for child in children:
            if child.pid is not None:
                child.join()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m datasync.transfer.worker [--processes N] [--once]`` (settings from the
    environment and config file, as ``datasync worker``)."""
    import argparse

    from datasync.config import load_settings

    parser = argparse.ArgumentParser(prog="datasync-worker")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--lease-seconds", type=float, default=WorkerOptions().lease_seconds)
    parser.add_argument("--backoff", type=float, default=WorkerOptions().queue_backoff_base)
    args = parser.parse_args(argv)
    opts = WorkerOptions(lease_seconds=args.lease_seconds, queue_backoff_base=args.backoff)
    logging.basicConfig(level=os.environ.get("DATASYNC_LOG", "WARNING"))
    run_worker(load_settings(), processes=args.processes, once=args.once, options=opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
