"""``datasync verify``: find damage at a site, mark it, and have it repaired.

Two checks, both against the site's storage read back now (never the database's word):

* **Views** of READY placements: every file of the manifest exists at
  ``<dataset>/<version-id>/<path>`` and is its blob. On POSIX that is the same inode as
  the blob-store file (a copy, made where hard links were impossible, must hash to the
  digest); nothing else may be in the view. On object stores the completion marker must
  exist and each object must have its size; with a version named, each object is re-hashed.
* **Blobs**: blob-store replicas are re-hashed, least recently verified first, at a
  bounded rate (``rate`` bytes/s) and, for the periodic run, within a byte budget; a
  blob that hashes right gets a fresh ``verified_at``, one that does not (or is gone) is
  marked bad.

A damaged view makes its placement DAMAGED (not READY: stage requests wait). With
``repair`` the placement is re-planned at once: bad blobs move again from another replica
and the view is published anew, atomically (POSIX: a rebuilt tree swapped in; object
stores: the marker is removed first, so readers see no view until every object verified
again). Without ``repair`` nothing at the site is touched.
"""

from __future__ import annotations

import os
import stat as statmod
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.backends.base import Backend, SupportsLocalTree
from datasync.db.tables import Entry
from datasync.db.transfer_tables import Placement, Replica
from datasync.errors import NotFound, StorageError, UserError
from datasync.manifest.hashing import hash_file
from datasync.manifest.store import ManifestStore
from datasync.models import PlacementState, ReplicaKind, ReplicaState, VersionSummary
from datasync.transfer.exec.context import SiteBackends
from datasync.transfer.layout import COMPLETE_MARKER, blob_key, view_prefix
from datasync.transfer.readback import hash_object
from datasync.transfer.service import ReplicationService
from datasync.transfer.state import EngineState, ReplicaRow, row_id
from datasync.transfer.views.objects import is_marked

__all__ = ["Damage", "Pacer", "Verifier", "VerifyReport"]

_SHOWN = 5
_WHOLE = 2**62  # a chunk size no file reaches: hash_file gives the whole-file digest


class Pacer:
    """Keeps hashing under ``rate`` bytes per second (None: no limit). Thread-safe."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start = clock()
        self._taken = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            self._taken += nbytes
            ahead = self._taken / self.rate - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)


@dataclass
class Damage:
    placement_id: int
    dataset: str
    version_id: str
    problems: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.problems += 1
        if len(self.first) < _SHOWN:
            self.first.append(problem)

    @property
    def reason(self) -> str:
        return (
            f"verify: {self.problems} problem(s) in the view of {self.dataset}@"
            f"{self.version_id[:12]} (first: {'; '.join(self.first)})"
        )


@dataclass
class VerifyReport:
    site: str
    views_checked: int = 0
    files_checked: int = 0
    blobs_checked: int = 0
    bytes_hashed: int = 0
    bad_blobs: list[str] = field(default_factory=list)  # "digest at key: why"
    damaged: list[Damage] = field(default_factory=list)
    repairs_planned: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.bad_blobs and not self.damaged


class Verifier:
    """Built by ``bootstrap``; used by ``datasync verify`` and the maintenance schedule."""

    def __init__(
        self,
        engine: Engine,
        store: ManifestStore,
        state: EngineState,
        backends: SiteBackends,
        replication: ReplicationService,
    ) -> None:
        self.engine = engine
        self.store = store
        self.state = state
        self.backends = backends
        self.replication = replication

    def verify(
        self,
        site: str,
        ref: str | None = None,
        *,
        repair: bool = False,
        rate: float | None = None,
        blob_budget: int | None = None,
    ) -> VerifyReport:
        """Check ``site`` (only ``ref``'s view and blobs when given). ``blob_budget``: at
        most this many bytes of blobs re-hashed (the least recently verified first)."""
        if site not in self.replication.settings.sites:
            raise UserError(f"unknown site {site!r}")
        started = time.monotonic()
        report = VerifyReport(site)
        pacer = Pacer(rate)
        backend = self.backends[site]
        version = self.store.resolve(ref) if ref is not None else None
        digests = (
            {e.digest for e in self.store.iter_entries(version)} if version is not None else None
        )
        for digest, key, size, etag in self._blobs(site, digests, blob_budget):
            problem = self._check_blob(backend, site, digest, key, size, etag, pacer, report)
            if problem is not None:
                report.bad_blobs.append(f"{digest} at {key}: {problem}")
                self.state.replicas.mark_bad(site, digest, key, f"verify: {problem}")
        for placement_id, dataset, version_id in self._views(site, version):
            damage = Damage(placement_id, dataset, version_id)
            self._check_view(backend, damage, pacer, report, deep=version is not None)
            report.views_checked += 1
            if damage.problems:
                report.damaged.append(damage)
        bad = {d.split(" ", 1)[0] for d in report.bad_blobs}
        for damage in report.damaged:
            self.state.placements.damage(damage.placement_id, damage.reason)
        if bad:  # views built on a bad blob are damaged too, even if they still look right
            known = {d.placement_id for d in report.damaged}
            report.damaged += self.damage_views_using(site, bad, "verify", "damaged", known)
        if repair:
            report.repairs_planned = self.repair_damaged(site, "repairing: re-planned by verify")
        report.seconds = time.monotonic() - started
        return report

    # -- blobs ----------------------------------------------------------------------------

    def _blobs(
        self, site: str, digests: set[str] | None, budget: int | None
    ) -> Iterator[tuple[str, str, int, str | None]]:
        query = (
            sa.select(col(Replica.digest), col(Replica.key), col(Replica.size), col(Replica.etag))
            .where(
                col(Replica.site) == site,
                col(Replica.kind) == ReplicaKind.BLOB,
                col(Replica.state) == ReplicaState.OK,
            )
            .order_by(col(Replica.verified_at), col(Replica.digest))
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.execution_options(yield_per=1000))
            yield from self._within(rows, digests, budget)

    @staticmethod
    def _within(
        rows: Iterable[Any], digests: set[str] | None, budget: int | None
    ) -> Iterator[tuple[str, str, int, str | None]]:
        spent = 0
        for digest, key, size, etag in rows:
            if digests is not None and digest not in digests:
                continue
            if budget is not None and spent + size > budget and spent:
                return
            spent += size
            yield str(digest), str(key), int(size), etag

    def _check_blob(
        self,
        backend: Backend,
        site: str,
        digest: str,
        key: str,
        size: int,
        etag: str | None,
        pacer: Pacer,
        report: VerifyReport,
    ) -> str | None:
        report.blobs_checked += 1
        try:
            info = backend.stat(key)
        except NotFound:
            return "missing"
        if info.size != size:
            return f"holds {info.size} bytes, not {size}"
        pacer.take(size)
        got = hash_object(backend, key, size)
        report.bytes_hashed += size
        if got != digest:
            return f"hashes to {got}"
        self.state.replicas.record(site, [ReplicaRow(digest, size, key, info.etag or etag)])
        return None

    # -- views ----------------------------------------------------------------------------

    def _views(self, site: str, version: VersionSummary | None) -> list[tuple[int, str, str]]:
        query = sa.select(
            col(Placement.id), col(Placement.dataset), col(Placement.version_id)
        ).where(col(Placement.site) == site, col(Placement.state) == PlacementState.READY)
        if version is not None:
            query = query.where(
                col(Placement.dataset) == version.dataset,
                col(Placement.version_id) == version.version_id,
            )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(col(Placement.id))).all()
        return [(row_id(p), str(d), str(v)) for p, d, v in rows]

    def _check_view(
        self, backend: Backend, damage: Damage, pacer: Pacer, report: VerifyReport, *, deep: bool
    ) -> None:
        version = self.store.resolve(f"{damage.dataset}@{damage.version_id}")
        prefix = view_prefix(damage.dataset, damage.version_id)
        tree = backend if backend.capabilities.local_tree else None
        if isinstance(tree, SupportsLocalTree):
            self._check_posix_view(Path(tree.root), prefix, version, damage, pacer, report)
            return
        if not is_marked(backend, prefix):
            damage.add(f"no {COMPLETE_MARKER}: the view is not published")
            return
        seen: set[str] = set()
        for entry in self.store.iter_entries(version):
            key = f"{prefix}/{entry.path}"
            seen.add(key)
            report.files_checked += 1
            try:
                info = backend.stat(key)
            except NotFound:
                damage.add(f"{entry.path} is missing")
                continue
            if info.size != entry.size:
                damage.add(f"{entry.path} holds {info.size} bytes, not {entry.size}")
            elif deep:
                pacer.take(entry.size)
                report.bytes_hashed += entry.size
                if hash_object(backend, key, entry.size) != entry.digest:
                    damage.add(f"{entry.path} does not hash to {entry.digest}")
        for obj in backend.list(prefix + "/"):
            if obj.key not in seen and obj.key != f"{prefix}/{COMPLETE_MARKER}":
                damage.add(f"{obj.key[len(prefix) + 1 :]} is not part of the version")

    def _check_posix_view(
        self,
        root: Path,
        prefix: str,
        version: VersionSummary,
        damage: Damage,
        pacer: Pacer,
        report: VerifyReport,
    ) -> None:
        view = root / prefix
        if not view.is_dir():
            damage.add("the view directory is missing")
            return
        seen: set[str] = set()
        for entry in self.store.iter_entries(version):
            seen.add(entry.path)
            report.files_checked += 1
            path = view / entry.path
            try:
                st = os.lstat(path)
            except OSError:
                damage.add(f"{entry.path} is missing")
                continue
            if not statmod.S_ISREG(st.st_mode):
                damage.add(f"{entry.path} is not a regular file")
                continue
            try:
                blob = os.stat(root / blob_key(entry.digest))
                same = (blob.st_dev, blob.st_ino) == (st.st_dev, st.st_ino)
            except OSError:
                same = False
            if same:
                continue  # the blob itself is re-hashed by the blob check
            pacer.take(entry.size)
            report.bytes_hashed += entry.size
            try:
                got, _ = hash_file(path, _WHOLE)
            except OSError as exc:
                damage.add(f"{entry.path} cannot be read: {exc.strerror}")
                continue
            if got != entry.digest:
                damage.add(f"{entry.path} is not its blob and hashes to {got}")
        for dirpath, _dirs, files in os.walk(view):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), view)
                if rel not in seen:
                    damage.add(f"{rel} is not part of the version")

    def damage_views_using(
        self, site: str, digests: set[str], who: str, what: str, known: set[int] | None = None
    ) -> list[Damage]:
        """Mark DAMAGED every READY view at ``site`` whose version holds one of ``digests``
        (blobs ``who`` found ``what``), except the placements in ``known``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    col(Placement.id), col(Placement.dataset), col(Placement.version_id)
                ).where(
                    col(Placement.site) == site,
                    col(Placement.state) == PlacementState.READY,
                    sa.exists().where(
                        col(Entry.version_pk) == col(Placement.version_pk),
                        col(Entry.digest).in_(sorted(digests)),
                    ),
                )
            ).all()
        damaged = []
        for pid, dataset, version_id in rows:
            if row_id(pid) in (known or set()):
                continue
            reason = f"{who}: the view of {dataset}@{version_id[:12]} uses a {what} blob"
            self.state.placements.damage(row_id(pid), reason)
            damaged.append(Damage(row_id(pid), str(dataset), str(version_id), 1, [reason]))
        return damaged

    # -- repair ---------------------------------------------------------------------------

    def repair_damaged(self, site: str, note: str) -> list[int]:
        """Re-plan every DAMAGED placement at ``site`` (``note`` goes to its history); on
        object stores its view's marker goes first, so readers see no view until every
        object verified again. Returns the placements re-planned."""
        backend = self.backends[site]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(col(Placement.id), col(Placement.dataset), col(Placement.version_id))
                .where(col(Placement.site) == site, col(Placement.state) == PlacementState.DAMAGED)
                .order_by(col(Placement.id))
            ).all()
        planned = []
        for pid, dataset, version_id in rows:
            if not backend.capabilities.local_tree:
                # The view stops being published until every object verified again.
                try:
                    backend.delete(f"{view_prefix(dataset, version_id)}/{COMPLETE_MARKER}")
                except StorageError:
                    continue  # left DAMAGED; the next run tries again
            if self.replication.repair(row_id(pid), note):
                planned.append(row_id(pid))
        return planned
