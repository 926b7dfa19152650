"""Where each process's metrics live, and what ``/metrics`` shows.

**Multiprocess mode (the choice for every real process).** Workers are separate OS
processes, each with its own event bus, so a process that runs datasync's entry point
(the console script, or a worker spawned by it) records its event metrics with
prometheus_client's multiprocess values into the host's directory
``$DATASYNC_HOME/metrics/<hostname>/``: one small mmap file per process and metric type.
``datasync serve`` and ``datasync up`` (and ``datasync worker --metrics-port``) add every
file up at scrape time, so one scrape target per host sees every datasync process there,
short-lived CLI commands included. The supervisor hands the directory to the workers it
spawns (``ChildObservability``) before they build their metrics.

**Dead processes keep counting.** A scrape first folds the counter and histogram files of
processes that are gone into ``counter_archive.db`` / ``histogram_archive.db``, so totals
never go backwards when a worker exits and files do not pile up. The fold is exactly-once:
it writes the new archive aside, journals the files it consumed, renames the archive into
place, then deletes them; a crash at any step is finished or undone by the next fold
(``_recover``). Scrapes and folds hold an exclusive ``flock`` on the directory.

**Single-process mode.** An ``App`` built in a process that did not ask for host metrics
(tests, Python callers) gets its own private registry: nothing is shared or written.

prometheus_client picks its value class when it is imported and when metrics are built;
``enable_multiprocess`` sets both, from the composition root, before any metric exists.
Nothing here runs at import time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasync.observe.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

__all__ = [
    "HostMetricsCollector",
    "compact",
    "enable_multiprocess",
    "exposition_registry",
    "host_metrics_dir",
    "multiprocess_dir",
    "process_metrics",
    "record_host_metrics",
    "wants_host_metrics",
]

log = logging.getLogger(__name__)

_MERGED_TYPES = ("counter", "histogram")  # gauges here come from the database, not events
_LOCK = ".lock"


@dataclass
class _Process:
    wanted: bool = False  # this process records into its host's directory
    directory: Path | None = None
    metrics: Metrics | None = None


_process = _Process()
_process_lock = threading.Lock()


def record_host_metrics() -> None:
    """Make this process record its events into the host's metrics directory (called by
    process entry points: the console script, a spawned worker)."""
    _process.wanted = True


def wants_host_metrics() -> bool:
    return _process.wanted


def host_metrics_dir(home: Path) -> Path:
    """One directory per host: liveness is judged by pid, which only means something here."""
    return home / "metrics" / socket.gethostname()


def multiprocess_dir() -> Path | None:
    """The directory this process records into, or None (single-process mode)."""
    return _process.directory


def enable_multiprocess(directory: Path) -> None:
    """Switch this process to multiprocess values in ``directory`` (once; later calls with
    another directory keep the first, with a warning). Raises ``OSError`` when the
    directory cannot be used; nothing is switched then."""
    with _process_lock:
        if _process.directory is not None:
            if _process.directory != directory:
                log.warning(
                    "metrics already recorded in %s; ignoring %s", _process.directory, directory
                )
            return
        directory.mkdir(parents=True, exist_ok=True)
        compact(directory)  # also proves the directory is ours to write
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _process.directory = directory
        _process.wanted = True


def process_metrics() -> Metrics:
    """This process's one ``Metrics`` in multiprocess mode (two instances would overwrite
    each other's values in the same file)."""
    with _process_lock:
        if _process.directory is None:
            raise RuntimeError("multiprocess metrics are not enabled in this process")
        if _process.metrics is None:
            _process.metrics = Metrics(registry=None)
        return _process.metrics


# -- the fold of dead processes' files -------------------------------------------------------


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_of(name: str) -> int | None:
    tail = name.removesuffix(".db").rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def compact(directory: Path) -> None:
    """Fold the files of dead processes into the archives (see the module docstring)."""
    with _locked(directory):
        _compact_locked(directory)


def _compact_locked(directory: Path) -> None:
    for typ in _MERGED_TYPES:
        _recover(directory, typ)
        dead = [
            path
            for path in sorted(directory.glob(f"{typ}_*.db"))
            if (pid := _pid_of(path.name)) is not None and not _alive(pid)
        ]
        if dead:
            _fold(directory, typ, dead)
    for path in directory.glob("gauge_live*_*.db"):
        if (pid := _pid_of(path.name)) is not None and not _alive(pid):
            path.unlink(missing_ok=True)


def _paths(directory: Path, typ: str) -> tuple[Path, Path, Path]:
    return (
        directory / f"{typ}_archive.db",
        directory / f".{typ}_archive.tmp",
        directory / f".{typ}_journal",
    )


def _read_values(path: Path) -> list[tuple[str, float]]:
    from prometheus_client.mmap_dict import MmapedDict

    found = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
    return [(str(key), float(value)) for key, value, _ts, _pos in found]


def _write_values(path: Path, values: dict[str, float]) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    out: Any = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    try:
        for key, value in values.items():
            out.write_value(key, value, 0.0)
    finally:
        out.close()


def _fold(directory: Path, typ: str, dead: list[Path]) -> None:
    archive, tmp, journal = _paths(directory, typ)
    totals: dict[str, float] = {}
    for path in [archive, *dead] if archive.exists() else dead:
        # Raw per-process values (histogram buckets are not cumulative here): sums are exact.
        for key, value in _read_values(path):
            totals[key] = totals.get(key, 0.0) + value
    tmp.unlink(missing_ok=True)
    _write_values(tmp, totals)
    journal_tmp = journal.with_suffix(".new")
    journal_tmp.write_text("\n".join(p.name for p in dead) + "\n", encoding="utf-8")
    os.replace(journal_tmp, journal)
    os.replace(tmp, archive)  # the commit point: from here the dead files count in the archive
    for path in dead:
        path.unlink(missing_ok=True)
    journal.unlink()


def _recover(directory: Path, typ: str) -> None:
    """Finish or undo a fold that a crash interrupted."""
    _archive, tmp, journal = _paths(directory, typ)
    journal.with_suffix(".new").unlink(missing_ok=True)
    if not journal.exists():
        tmp.unlink(missing_ok=True)  # never committed: the dead files still count once
        return
    if tmp.exists():  # journaled but not renamed: undo
        tmp.unlink()
        journal.unlink()
        return
    for name in journal.read_text(encoding="utf-8").split():
        (directory / name).unlink(missing_ok=True)  # renamed: finish
    journal.unlink()


class HostMetricsCollector:
    """Every process's event metrics in one host directory, dead processes folded first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with _locked(self.directory):
            _compact_locked(self.directory)
            files = [str(p) for p in self.directory.glob("*.db")]
            merged = list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        yield from merged


def exposition_registry(private: CollectorRegistry | None, *state: Collector) -> CollectorRegistry:
    """What ``/metrics`` shows: the host's event metrics (or ``private`` in single-process
    mode) and the given state collectors."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    directory = _process.directory
    if directory is not None:
        registry.register(HostMetricsCollector(directory))
    elif private is not None:
        registry.register(private)
    for collector in state:
        registry.register(collector)
    return registry
