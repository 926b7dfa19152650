"""What every fault test checks after its run, independently of datasync's own code.

A fault run ends in one of two ways, and both are acceptable: the placement is READY, or it
FAILED with a classified reason (``<kind> task N failed (<why>): <ErrorClass>: ...``, or a
planning reason). In both cases:

* nothing corrupt or partial is published: a READY view is re-read with the store's own
  SDK (or ``xxh128sum`` on POSIX) and must equal the source tree; a FAILED placement shows
  no view (POSIX: no version directory; object stores: no completion marker);
* the blob store holds nothing wrong: every object under ``.datasync/blobs/`` hashes to the
  digest its name says, and every ``ok`` blob replica in the index is there (data lost = 0);
* no task is lost: every task is ``done`` or ``failed`` with a reason, none ``leased`` or
  ``queued``.

``run_workers`` runs the worker loop in this process on the test's own ``App``, so every
``TaskRetried`` event reaches the test's subscriber. ``record`` appends one row of figures
to ``$DATASYNC_FAULT_REPORT`` (JSON lines) when that is set; ``docs/reliability.md`` is
written from those rows.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import xxhash
from sqlmodel import col

from datasync.backends.posix.io import TEMP_RE
from datasync.bootstrap import App
from datasync.db.transfer_tables import Replica, Task
from datasync.events import Event, TaskFailed, TaskRetried
from datasync.integrity.audit import QUARANTINE_PREFIX
from datasync.transfer.layout import BLOB_PREFIX, COMPLETE_MARKER
from datasync.transfer.supervisor import WorkerOptions
from tests.fixtures.rawstore import object_bytes
from tests.fixtures.replication import Site, xxh128sum_tree

FAST = WorkerOptions(
    queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30, task_slots=4, io_threads=4
)
# A classified failure names the task, why it stopped, and the error's class.
CLASSIFIED = re.compile(r"\w+ task \d+ failed \((permanent error|\d+ attempts)\): [A-Z]\w+: ")


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


@dataclass
class Figures:
    """One row of ``docs/reliability.md``."""

    fault: str
    where: str
    db: str
    outcome: str = ""
    reason: str | None = None
    injected: int = 0
    retries_seen: int = 0  # repeats of a hit request seen by the proxy (call and task level)
    task_retries: int = 0  # TaskRetried events
    stuck: int = 0  # TaskStuck events
    data_lost: int = 0
    seconds: float = 0.0
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class EventLog:
    """Subscribed to ``App.bus``: the retries and failures a run caused."""

    def __init__(self, app: App) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        app.bus.subscribe(self)

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def count(self, kind: type[Event]) -> int:
        with self._lock:
            return sum(1 for e in self.events if isinstance(e, kind))

    def failures(self) -> list[TaskFailed]:
        with self._lock:
            return [e for e in self.events if isinstance(e, TaskFailed)]

    def retried(self) -> list[TaskRetried]:
        with self._lock:
            return [e for e in self.events if isinstance(e, TaskRetried)]


def run_workers(
    app: App,
    placement_ids: list[int],
    *,
    options: WorkerOptions = FAST,
    timeout: float = 120.0,
    stop: threading.Event | None = None,
) -> bool:
    """The worker loop in this process until the placements have no queued or leased task.
    False when ``timeout`` passed first (or ``stop`` was set)."""
    stop = stop or threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.daemon = True
    timer.start()
    loop = app.worker(options)
    try:
        loop.run(stop, once=True, placements=placement_ids)
    finally:
        timer.cancel()
        loop.close()
    return not stop.is_set()


@contextmanager
def timed(figures: Figures) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        figures.seconds = round(time.monotonic() - started, 1)


def record(figures: Figures) -> None:
    path = os.environ.get("DATASYNC_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(figures), default=str) + "\n")


# -- the checks ----------------------------------------------------------------------------


def assert_no_task_lost(app: App, placement_id: int) -> dict[str, int]:
    """Every task done, or failed with its reason in the history; none leased or queued."""
    with app.engine.connect() as conn:
        rows = conn.execute(
            sa.select(col(Task.id), col(Task.state), col(Task.errors)).where(
                col(Task.placement_id) == placement_id
            )
        ).all()
    states: dict[str, int] = {}
    for task_id, state, errors in rows:
        states[str(state)] = states.get(str(state), 0) + 1
        assert state in ("done", "failed"), f"task {task_id} left {state}"
        if state == "failed":
            assert errors, f"task {task_id} failed without a reason"
    return states


def assert_outcome(app: App, placement_id: int, figures: Figures) -> str:
    """READY, or FAILED with a classified reason; fills ``figures`` and returns the state."""
    (st,) = app.replication.status(placement_id=placement_id)
    figures.outcome = str(st.state)
    figures.reason = st.error
    assert st.state in ("READY", "FAILED"), (st.state, st.phase, st.last_errors)
    if st.state == "FAILED":
        assert st.error, "a failed placement must say why"
        assert CLASSIFIED.search(st.error) or "no source" in st.error, st.error
    return str(st.state)


def view_digests(site: Site, dataset: str, version_id: str) -> dict[str, str] | None:
    """``path -> xxh3`` of the published view, read by the store's SDK or ``xxh128sum``;
    None when nothing is published (no directory, or no completion marker)."""
    if site.kind == "posix":
        assert site.root is not None
        view = site.root / dataset / version_id
        if not view.is_dir():
            return None
        return xxh128sum_tree(view)
    objects = sdk_objects(site, f"{dataset}/{version_id}/")
    if f"{dataset}/{version_id}/{COMPLETE_MARKER}" not in objects:
        return None
    prefix = f"{dataset}/{version_id}/"
    return {k[len(prefix) :]: xxh(v) for k, v in objects.items() if not k.endswith(COMPLETE_MARKER)}


def assert_published_right(
    site: Site, dataset: str, version_id: str, files: dict[str, bytes], state: str
) -> int:
    """A READY view equals ``files`` byte for byte; a FAILED one is not there. Returns the
    number of published files whose bytes are wrong (data lost), which must be 0."""
    got = view_digests(site, dataset, version_id)
    if state != "READY":
        assert got is None, f"a {state} placement shows a view at {site.name}"
        return 0
    assert got is not None, f"READY but no view at {site.name}"
    want = {p: xxh(d) for p, d in files.items()}
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:10]
    wrong = [p for p in want if got[p] != want[p]]
    assert not wrong, f"{len(wrong)} published file(s) hold wrong bytes: {wrong[:3]}"
    return len(wrong)


def assert_blob_store_sound(app: App, site: Site) -> int:
    """Every blob-store object hashes to its name; every ok blob replica exists and hashes
    right. Returns the count of problems (data lost), which must be 0. A killed writer's
    hidden temp file (``.<name>.datasync-<token>.part``) is no object: ``leftover_temps``
    counts those (the audit quarantines them)."""
    if site.kind == "posix":
        assert site.root is not None
        store = site.root / BLOB_PREFIX
        stored = xxh128sum_tree(store) if store.is_dir() else {}
        stored = {
            f"{BLOB_PREFIX}{k}": v for k, v in stored.items() if not TEMP_RE.match(Path(k).name)
        }
    else:
        stored = {k: xxh(v) for k, v in sdk_objects(site, BLOB_PREFIX).items()}
    wrong = [k for k, h in stored.items() if k.rsplit("/", 1)[-1] != h]
    with app.engine.connect() as conn:
        keys = conn.execute(
            sa.select(col(Replica.key)).where(
                col(Replica.site) == site.name,
                col(Replica.kind) == "blob",
                col(Replica.state) == "ok",
            )
        ).scalars()
        missing = [k for k in keys if k not in stored]
    assert not wrong, f"blob objects under the wrong name at {site.name}: {wrong[:3]}"
    assert not missing, f"ok replicas missing from {site.name}: {missing[:3]}"
    return len(wrong) + len(missing)


def leftover_temps(site: Site) -> list[str]:
    """Hidden temp files of killed writers at a POSIX site (never visible as objects),
    outside the audit's quarantine."""
    assert site.root is not None
    found = (str(p.relative_to(site.root)) for p in site.root.rglob("*") if TEMP_RE.match(p.name))
    return sorted(k for k in found if not k.startswith(QUARANTINE_PREFIX))


# -- independent readers ---------------------------------------------------------------------


def sdk_objects(site: Site, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` at a cloud site, downloaded by the store's own SDK
    (straight to the emulator, never through a fault proxy)."""
    return object_bytes(site.kind, site.config, prefix)
