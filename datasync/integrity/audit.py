"""``datasync audit``: compare a site's index with a listing of its storage (Rucio's auditor).

``verify`` re-hashes what the index names; the audit lists what is really there, which is
cheap, and finds what the index cannot: files that vanished (lost) and files nobody
recorded (dark). It never races with running transfers, because it reads the index before
and after the listing (two snapshots) and acts only on what both agree on:

* **lost**: a blob replica ``ok`` in the index before the listing began (``verified_at`` at
  most the audit's start, so the row existed then and has not changed since), missing from
  the listing, still unchanged in the index after the listing, and missing from a ``stat``
  made then. It is marked bad (``ReplicaStates.mark_bad``), every READY view using it is
  DAMAGED and re-planned (``Verifier.damage_views_using`` and ``repair_damaged``, exactly
  as ``verify`` does), so workers move it again. A listed blob whose size differs from its
  row is **damaged** and handled the same way. A READY view missing from the site (POSIX:
  no version directory; object stores: no completion marker) is DAMAGED and re-planned.
* **dark**: only under datasync's own names, never a user's file: an object in
  ``.datasync/`` (blob store or elsewhere) with no index row in either snapshot; a POSIX
  writer's temp file (``.<name>.datasync-<token>.part``) whose token no open upload holds;
  a POSIX publish staging directory (``<dataset>/.staging-<version-id>-*``). Object stores
  hide unfinished uploads from listings (S3 multipart uploads, GCS ``.datasync-parts/``,
  Azure uncommitted blocks): bucket lifecycle rules expire those. Each must be older than
  the grace period (a blob committed but not yet recorded, a publish in progress). Dark
  files are moved, never deleted, to ``.datasync/quarantine/<UTC time of the audit>/<key>``
  (a rename on POSIX, copy then delete on object stores), where an operator inspects and
  deletes them.
* **views without a placement** at the site are reported, never moved: they may be a
  reader's only copy.

Guard (Rucio's): when the lost or dark files are more than ``ABORT_FRACTION`` of what was
indexed or listed (and more than ``ABORT_MIN``), the listing is presumed wrong (an
unmounted file system, the wrong bucket): the audit reports and changes nothing unless
``force`` is given.

The last summary of each site is kept in ``$DATASYNC_HOME/audit/<site>.json``
(``last_audit``), for ``explain`` and operators; lost replicas and missing views also
leave their reason in the placements' history (``explain`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat as statmod
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.backends.base import Backend, ObjectInfo, SupportsLocalTree, SupportsRename
from datasync.backends.posix.io import TEMP_RE, translate_os_errors
from datasync.db.engine import is_postgresql
from datasync.db.transfer_tables import Placement, Replica, Upload
from datasync.errors import NotFound, StorageError, UserError
from datasync.integrity.verify import Verifier
from datasync.manifest.refs import check_dataset_name
from datasync.models import PlacementState, ReplicaKind, ReplicaState
from datasync.transfer.exec.context import SiteBackends
from datasync.transfer.layout import BLOB_PREFIX, COMPLETE_MARKER, blob_key
from datasync.transfer.state import EngineState, as_utc, row_id
from datasync.transfer.views import view_present

__all__ = [
    "ABORT_FRACTION",
    "ABORT_MIN",
    "DEFAULT_GRACE",
    "QUARANTINE_PREFIX",
    "AuditReport",
    "Auditor",
    "last_audit",
]

QUARANTINE_PREFIX = ".datasync/quarantine/"
DEFAULT_GRACE = timedelta(hours=6)
ABORT_FRACTION = 0.10
ABORT_MIN = 20
_PAGE = 2000
_SHOWN = 20  # keys listed per kind in a report (counts are exact)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STAGING = re.compile(r"^\.staging-([0-9a-f]{64})-")
_MARKER = re.compile(
    r"^(?P<dataset>.+)/(?P<version>[0-9a-f]{64})/" + re.escape(COMPLETE_MARKER) + "$"
)


@dataclass
class AuditReport:
    site: str
    started_at: str = ""
    seconds: float = 0.0
    indexed: int = 0  # ok blob replicas in the index before the listing
    listed: int = 0  # objects listed in the blob store
    lost: list[str] = field(default_factory=list)  # "digest at key: why"
    missing_views: list[str] = field(default_factory=list)  # "dataset@version"
    dark: list[str] = field(default_factory=list)  # keys (dirs end with "/")
    quarantined: list[str] = field(default_factory=list)  # "key -> quarantine key"
    too_young: int = 0  # dark candidates inside the grace period, left alone
    orphan_views: list[str] = field(default_factory=list)  # "dataset/version-id"
    damaged_placements: list[int] = field(default_factory=list)
    repairs_planned: list[int] = field(default_factory=list)
    aborted: str | None = None
    dry_run: bool = False

    @property
    def clean(self) -> bool:
        return not (self.lost or self.missing_views or self.dark or self.orphan_views)

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints and ``last_audit`` returns: counts, and the first keys."""
        doc = asdict(self)
        for name in ("lost", "missing_views", "dark", "quarantined", "orphan_views"):
            doc[f"{name}_count"] = len(doc[name])
            doc[name] = doc[name][:_SHOWN]
        doc["clean"] = self.clean
        return doc


@dataclass(frozen=True, slots=True)
class _Row:
    digest: str
    key: str
    size: int
    trusted: bool  # ok, and unchanged since before the listing began


@dataclass(frozen=True, slots=True)
class _Dark:
    key: str
    mtime: float | None
    directory: bool = False
    token: str | None = None  # a writer's temp: the upload token it belongs to


class Auditor:
    """Built by ``bootstrap``; used by ``datasync audit`` and the maintenance schedule."""

    def __init__(
        self,
        engine: Engine,
        state: EngineState,
        backends: SiteBackends,
        verifier: Verifier,
        home: Path,
    ) -> None:
        self.engine = engine
        self.state = state
        self.backends = backends
        self.verifier = verifier
        self.home = home

    def audit(
        self,
        site: str,
        *,
        grace: timedelta = DEFAULT_GRACE,
        dry_run: bool = False,
        force: bool = False,
    ) -> AuditReport:
        """Audit ``site``; with ``dry_run`` report only (nothing marked, moved or planned)."""
        if site not in self.verifier.replication.settings.sites:
            raise UserError(f"unknown site {site!r}")
        started = time.monotonic()
        t1 = self._now()
        report = AuditReport(site, started_at=t1.isoformat(timespec="seconds"), dry_run=dry_run)
        backend = self.backends[site]
        tree = backend if isinstance(backend, SupportsLocalTree) else None
        local = tree is not None and backend.capabilities.local_tree
        # -- the listing, merged with the first snapshot ----------------------------------
        listing = backend.list(BLOB_PREFIX if local else "")
        views: set[tuple[str, str]] = set()
        others: list[_Dark] = []
        blobs = self._route(listing, views, others, local)
        lost_rows, dark_blobs, damaged_rows = self._merge(site, t1, blobs, report)
        if tree is not None and local and (Path(tree.root) / ".datasync").is_dir():
            # Without a blob store datasync never wrote here (a pure source site): no walk.
            others += self._walk_local(Path(tree.root), views)
        # -- the second snapshot ----------------------------------------------------------
        lost = self._still_lost(site, t1, backend, lost_rows)
        lost += self._still_damaged(site, t1, backend, damaged_rows)
        dark = self._still_dark(site, dark_blobs) + self._unowned(site, others)
        missing = self._missing_views(site, t1, backend, views)
        report.orphan_views = self._orphans(site, views)
        report.lost = [f"{row.digest} at {row.key}: {why}" for row, why in lost]
        report.missing_views = [f"{d}@{v}" for _pid, d, v in missing]
        cutoff = t1.timestamp() - grace.total_seconds()
        old = [d for d in dark if d.mtime is not None and d.mtime <= cutoff]
        report.too_young = len(dark) - len(old)
        report.dark = [d.key + ("/" if d.directory else "") for d in old]
        stray = sum(1 for d in old if d.key.startswith(BLOB_PREFIX) and d.token is None)
        if not force:
            report.aborted = _implausible(len(lost), report.indexed, stray, report.listed)
        if not dry_run and report.aborted is None:
            self._act(site, backend, t1, lost, missing, old, report)
        report.seconds = round(time.monotonic() - started, 3)
        if not dry_run:
            self._save(report)
        return report

    # -- the first snapshot, merged with the listing ----------------------------------------

    def _now(self) -> datetime:
        """The index's clock (PostgreSQL's on many hosts), as ``verified_at`` is written."""
        if is_postgresql(self.engine):
            with self.engine.connect() as conn:
                value = conn.execute(sa.text("SELECT now()")).scalar_one()
            return as_utc(value) or datetime.now(UTC)
        return datetime.now(UTC)

    @staticmethod
    def _route(
        listing: Iterable[ObjectInfo],
        views: set[tuple[str, str]],
        others: list[_Dark],
        local: bool,
    ) -> Iterator[ObjectInfo]:
        """Blob-store objects, in key order; on object stores also notes views (by their
        marker) and other datasync objects (temps, stray files under ``.datasync/``)."""
        for info in listing:
            key = info.key
            if key.startswith(BLOB_PREFIX):
                yield info
            elif local or key.startswith(QUARANTINE_PREFIX):
                continue
            elif key.startswith(".datasync/"):
                others.append(_Dark(key, info.mtime))
            elif (m := _MARKER.match(key)) is not None and _is_dataset(m["dataset"]):
                views.add((m["dataset"], m["version"]))

    def _index(self, site: str, t1: datetime) -> Iterator[_Row]:
        """Blob replicas at ``site`` in key order (keys are ``blob_key(digest)``), paged."""
        last = ""
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(
                        col(Replica.digest),
                        col(Replica.size),
                        col(Replica.state),
                        col(Replica.verified_at),
                    )
                    .where(
                        col(Replica.site) == site,
                        col(Replica.kind) == ReplicaKind.BLOB,
                        col(Replica.digest) > last,
                    )
                    .order_by(col(Replica.digest))
                    .limit(_PAGE)
                ).all()
            for digest, size, state, verified_at in rows:
                when = as_utc(verified_at)
                trusted = state == ReplicaState.OK and when is not None and when <= t1
                yield _Row(str(digest), blob_key(str(digest)), int(size), trusted)
            if len(rows) < _PAGE:
                return
            last = str(rows[-1][0])

    def _merge(
        self, site: str, t1: datetime, listing: Iterator[ObjectInfo], report: AuditReport
    ) -> tuple[list[_Row], list[_Dark], list[tuple[_Row, int]]]:
        """One pass over the index and the listing, both in key order: candidates for lost
        (indexed, not listed), dark (listed, not indexed) and damaged (sizes differ)."""
        lost: list[_Row] = []
        dark: list[_Dark] = []
        damaged: list[tuple[_Row, int]] = []
        rows, objects = _ascending(self._index(site, t1), site), iter(listing)
        row, obj = next(rows, None), next(objects, None)
        while row is not None or obj is not None:
            if obj is None or (row is not None and row.key < obj.key):
                assert row is not None
                report.indexed += row.trusted
                if row.trusted:
                    lost.append(row)
                row = next(rows, None)
            elif row is None or obj.key < row.key:
                report.listed += 1
                dark.append(_Dark(obj.key, obj.mtime))
                obj = next(objects, None)
            else:
                report.indexed += row.trusted
                report.listed += 1
                if row.trusted and obj.size != row.size:
                    damaged.append((row, obj.size))
                row, obj = next(rows, None), next(objects, None)
        return lost, dark, damaged

    def _walk_local(self, root: Path, views: set[tuple[str, str]]) -> list[_Dark]:
        """POSIX: writers' temps, publish staging directories and stray files under
        ``.datasync/`` (outside the blob store, which the listing covered); notes views.
        Published views, staging trees and the quarantine are not descended into."""
        found: list[_Dark] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            rel = "" if rel == "." else rel + "/"
            keep = []
            for name in dirnames:
                key = rel + name
                if key + "/" == QUARANTINE_PREFIX:
                    continue
                if _HEX64.match(name) and _is_dataset(rel[:-1]):
                    views.add((rel[:-1], name))
                    continue
                if _STAGING.match(name) and _is_dataset(rel[:-1]):
                    found.append(_Dark(key, _mtime(root / key), directory=True))
                    continue
                keep.append(name)
            dirnames[:] = keep
            in_datasync = (rel + "x").startswith(".datasync/")
            in_blobs = rel.startswith(BLOB_PREFIX)
            for name in filenames:
                key = rel + name
                match = TEMP_RE.match(name)
                if match is not None:
                    found.append(_Dark(key, _mtime(root / key), token=match.group(2)))
                elif in_datasync and not in_blobs:
                    found.append(_Dark(key, _mtime(root / key)))
        return found

    # -- the second snapshot --------------------------------------------------------------

    def _rows_now(self, site: str, digests: list[str]) -> dict[str, tuple[str, datetime | None]]:
        """``digest -> (state, verified_at)`` of the site's blob rows now."""
        out: dict[str, tuple[str, datetime | None]] = {}
        for start in range(0, len(digests), 500):
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(
                        col(Replica.digest), col(Replica.state), col(Replica.verified_at)
                    ).where(
                        col(Replica.site) == site,
                        col(Replica.kind) == ReplicaKind.BLOB,
                        col(Replica.digest).in_(digests[start : start + 500]),
                    )
                ).all()
            out.update({str(d): (str(s), as_utc(v)) for d, s, v in rows})
        return out

    def _unchanged(self, site: str, t1: datetime, rows: list[_Row]) -> Iterator[_Row]:
        now = self._rows_now(site, [r.digest for r in rows])
        for row in rows:
            state, when = now.get(row.digest, ("", None))
            if state == ReplicaState.OK and when is not None and when <= t1:
                yield row

    def _still_lost(
        self, site: str, t1: datetime, backend: Backend, rows: list[_Row]
    ) -> list[tuple[_Row, str]]:
        out = []
        for row in self._unchanged(site, t1, rows):
            try:
                backend.stat(row.key)
            except NotFound:
                out.append((row, "missing from storage"))
        return out

    def _still_damaged(
        self, site: str, t1: datetime, backend: Backend, rows: list[tuple[_Row, int]]
    ) -> list[tuple[_Row, str]]:
        sizes = dict((r.digest, size) for r, size in rows)
        out = []
        for row in self._unchanged(site, t1, [r for r, _ in rows]):
            with contextlib.suppress(NotFound):
                if backend.stat(row.key).size != row.size:
                    out.append((row, f"holds {sizes[row.digest]} bytes, not {row.size}"))
        return out

    def _still_dark(self, site: str, candidates: list[_Dark]) -> list[_Dark]:
        """Blob-store objects with no row in the second snapshot either (any state)."""
        digests = {d.key: _digest_of(d.key) for d in candidates}
        known = self._rows_now(site, sorted({g for g in digests.values() if g}))
        return [d for d in candidates if digests[d.key] not in known]

    def _unowned(self, site: str, found: list[_Dark]) -> list[_Dark]:
        """Temps whose token no open upload holds (now), staging dirs and stray files."""
        with self.engine.connect() as conn:
            tokens = set(
                conn.execute(sa.select(col(Upload.token)).where(col(Upload.site) == site)).scalars()
            )
        return [d for d in found if d.token is None or d.token not in tokens]

    def _placements(self, site: str) -> list[tuple[int, str, str, str, datetime | None]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    col(Placement.id),
                    col(Placement.dataset),
                    col(Placement.version_id),
                    col(Placement.state),
                    col(Placement.updated_at),
                ).where(col(Placement.site) == site)
            ).all()
        return [(row_id(p), str(d), str(v), str(s), as_utc(u)) for p, d, v, s, u in rows]

    def _missing_views(
        self, site: str, t1: datetime, backend: Backend, views: set[tuple[str, str]]
    ) -> list[tuple[int, str, str]]:
        """READY before the listing and still READY, yet no view found, nor by a stat now."""
        out = []
        for pid, dataset, version_id, state, updated in self._placements(site):
            ready_before = state == PlacementState.READY and updated is not None and updated <= t1
            seen = (dataset, version_id) in views
            if ready_before and not seen and not view_present(backend, dataset, version_id):
                out.append((pid, dataset, version_id))
        return out

    def _orphans(self, site: str, views: set[tuple[str, str]]) -> list[str]:
        placed = {(d, v) for _p, d, v, _s, _u in self._placements(site)}
        return [f"{d}/{v}" for d, v in sorted(views - placed)]

    # -- acting -----------------------------------------------------------------------------

    def _act(
        self,
        site: str,
        backend: Backend,
        t1: datetime,
        lost: list[tuple[_Row, str]],
        missing: list[tuple[int, str, str]],
        dark: list[_Dark],
        report: AuditReport,
    ) -> None:
        for row, why in lost:
            self.state.replicas.mark_bad(site, row.digest, row.key, f"audit: {why}")
        for pid, dataset, version_id in missing:
            reason = f"audit: the view of {dataset}@{version_id[:12]} is missing from {site}"
            if self.state.placements.damage(pid, reason):
                report.damaged_placements.append(pid)
        if lost:
            damaged = self.verifier.damage_views_using(
                site, {row.digest for row, _ in lost}, "audit", "lost"
            )
            report.damaged_placements += [d.placement_id for d in damaged]
        if report.damaged_placements:
            note = f"repairing: re-planned by audit ({len(lost)} blob(s) lost at {site})"
            report.repairs_planned = self.verifier.repair_damaged(site, note)
        folder = QUARANTINE_PREFIX + t1.strftime("%Y-%m-%dT%H%M%SZ") + "/"
        for item in dark:
            target = folder + item.key
            try:
                _quarantine(backend, item, target)
            except StorageError as exc:
                report.quarantined.append(f"{item.key} -> not moved: {exc}")
            else:
                report.quarantined.append(f"{item.key} -> {target}")

    def _save(self, report: AuditReport) -> None:
        folder = self.home / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{report.site}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report.summary(), indent=1, sort_keys=True))
        os.replace(tmp, path)


def _implausible(lost: int, indexed: int, dark: int, listed: int) -> str | None:
    """Rucio's guard: too many lost or unindexed blobs at once means the listing is wrong.
    (Writers' temps and staging trees are datasync's own leftovers: they never count.)"""
    for what, n, of in (("lost", lost, indexed), ("dark", dark, listed)):
        if n > ABORT_MIN and n > ABORT_FRACTION * of:
            return (
                f"{n} of {of} blob(s) look {what}: more than {ABORT_FRACTION:.0%}; the"
                " listing is presumed wrong (unmounted file system? wrong bucket?) and"
                " nothing was changed; check the site, then run with --force"
            )
    return None


def last_audit(home: Path, site: str) -> dict[str, Any] | None:
    """The summary of the last audit of ``site`` run from this ``home``, if any."""
    try:
        doc = json.loads((home / "audit" / f"{site}.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _quarantine(backend: Backend, item: _Dark, target: str) -> None:
    """Move ``item`` to ``target``: a rename where the backend has one, else a copy (the
    server's) and then a delete; a directory only on a local tree. A POSIX writer's temp is
    moved by path: the backend refuses temp names as keys (``partial_uploads`` leaves their
    removal to the caller)."""
    if item.token is not None and isinstance(backend, SupportsLocalTree):
        src, dst = Path(backend.root, item.key), Path(backend.root, target)
        with translate_os_errors(str(src)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        return
    if item.directory:
        if not isinstance(backend, SupportsLocalTree):
            raise StorageError(f"{item.key} is a directory and the site is no local tree")
        backend.rename_tree(item.key, target)
    elif backend.capabilities.atomic_rename and isinstance(backend, SupportsRename):
        backend.rename(item.key, target)
    else:
        backend.copy(item.key, target)
        backend.delete(item.key)


def _ascending(rows: Iterator[_Row], site: str) -> Iterator[_Row]:
    """The index's rows, checked to come in key order (the merge depends on it)."""
    previous = ""
    for row in rows:
        if row.key <= previous:
            raise StorageError(f"audit of {site}: the index is not in key order at {row.key}")
        previous = row.key
        yield row


def _is_dataset(rel: str) -> bool:
    try:
        check_dataset_name(rel)
    except UserError:
        return False
    return True


def _digest_of(key: str) -> str | None:
    """The digest a blob-store key names, or None for anything else found there."""
    parts = key[len(BLOB_PREFIX) :].split("/")
    if len(parts) != 3 or not _HEX32.match(parts[2]):
        return None
    if parts[0] != parts[2][0:2] or parts[1] != parts[2][2:4]:
        return None
    return f"xxh3-128:{parts[2]}"


def _mtime(path: Path) -> float | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_mtime if not statmod.S_ISLNK(st.st_mode) else None
