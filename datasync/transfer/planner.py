"""The planner: placement "version V at site S" -> tasks for ``manifest - site index``.

How it plans (Rucio derives transfers from rules the same way):

1. Drop the placement's old tasks (a re-plan after a crash or a retry starts clean; the
   replicas earlier tasks recorded stay, so nothing verified is moved twice), insert the
   ``publish`` task holding one *planning* count in ``blocked_by``, and count the files and
   bytes already present at the site.
2. Page through the version's *distinct* digests not yet ``ok`` at the site, in digest
   order (``entries (version_pk, digest)`` index; duplicates are adjacent, so one version's
   digest under many paths is one blob, and keyset paging never revisits a digest). Blobs
   at the site from ANY version are skipped by the ``NOT EXISTS`` on ``replicas``.
3. For each page, choose a source per blob among ``ok`` replicas at configured sites:
   lowest ``cost_per_gb`` from the source to the destination first, unknown cost last,
   then by site name. A blob larger than one chunk gets ``chunks`` tasks of
   ``chunks_per_task`` chunks each plus one ``finalize``; small blobs are batched into
   ``blobs`` tasks (at most ``batch_items`` items or ``batch_bytes`` bytes).
4. Release the planning count and move the placement to TRANSFERRING. If some blob has no
   source anywhere, the placement FAILS saying how many and which one first.

Memory is bounded by one page plus one open batch, whatever the manifest size; each page
is one short write transaction so workers start on early tasks while planning goes on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from datasync.config import Settings
from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.tables import entries_table, versions_table
from datasync.db.transfer_tables import NO_DEADLINE, Placement, Replica, Task
from datasync.errors import UserError
from datasync.transfer.taskqueue import fail_placement

__all__ = ["PlanResult", "PlannerConfig", "plan_placement", "source_cost"]

_P: sa.Table = Placement.__table__  # type: ignore[attr-defined]
_R: sa.Table = Replica.__table__  # type: ignore[attr-defined]
_T: sa.Table = Task.__table__  # type: ignore[attr-defined]
_E, _V = entries_table, versions_table

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Task sizing. Defaults: 4 x 64 MiB chunks per chunk task, 256 items / 64 MiB batches."""

    chunks_per_task: int = 4
    batch_items: int = 256
    batch_bytes: int = 64 * MIB
    page_size: int = 1000
    max_attempts: int = 8


@dataclass(slots=True)
class PlanResult:
    placement_id: int
    blobs: int = 0  # distinct blobs to move
    bytes_to_move: int = 0
    tasks: dict[str, int] = field(default_factory=dict)  # kind -> count
    pages: int = 0
    max_page_rows: int = 0
    files_present: int = 0
    bytes_present: int = 0
    no_source: int = 0
    state: str = "TRANSFERRING"


@dataclass(slots=True)
class _Blob:
    digest: str
    size: int
    files: int  # paths of the version holding this digest
    chunks: list[str]


@dataclass(slots=True)
class _Source:
    site: str
    key: str
    etag: str | None


def source_cost(settings: Settings, src: str, dst: str) -> float:
    """Cost per GB from ``src`` to ``dst`` as configured; unknown is infinite (last resort)."""
    site = settings.sites.get(src)
    if site is None:
        return math.inf
    return site.cost_per_gb.get(dst, math.inf)


class _Planner:
    def __init__(
        self, engine: Engine, settings: Settings, placement_id: int, config: PlannerConfig
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.config = config
        self.result = PlanResult(placement_id)
        self.placement_id = placement_id
        self.batch: list[tuple[_Blob, _Source]] = []
        self.batch_bytes = 0
        self.first_missing: str | None = None
        row = self._load()
        self.version_pk: int = row.version_pk
        self.dst: str = row.site
        self.priority: int = row.priority
        self.deadline: datetime | None = row.deadline
        self.chunk_size: int = row.chunk_size
        self.publish_id = 0

    def _load(self) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    _P.c.version_pk,
                    _P.c.site,
                    _P.c.priority,
                    _P.c.deadline,
                    _P.c.dataset,
                    _P.c.version_id,
                    _V.c.chunk_size,
                )
                .join(_V, _V.c.pk == _P.c.version_pk)
                .where(_P.c.id == self.placement_id)
            ).one_or_none()
        if row is None:
            raise UserError(f"placement {self.placement_id} does not exist")
        if row.site not in self.settings.sites:
            raise UserError(f"placement {self.placement_id}: site {row.site!r} is not configured")
        self.dataset: str = row.dataset
        self.version_id: str = row.version_id
        return row

    # -- task rows ---------------------------------------------------------------------

    def _task(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        parent: int | None,
        blocked_by: int = 0,
        files: int = 0,
        nbytes: int = 0,
        now: datetime,
    ) -> dict[str, Any]:
        self.result.tasks[kind] = self.result.tasks.get(kind, 0) + 1
        return {
            "placement_id": self.placement_id,
            "parent_id": parent,
            "kind": kind,
            "state": "queued",
            "priority": self.priority,
            "deadline": self.deadline or NO_DEADLINE,
            "created_at": now,
            "not_before": now,
            "blocked_by": blocked_by,
            "attempts": 0,
            "max_attempts": self.config.max_attempts,
            "payload": payload,
            "errors": [],
            "files": files,
            "bytes": nbytes,
            "bytes_moved": 0,
        }

    def _insert(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
        if not rows:
            return []
        result = conn.execute(
            sa.insert(_T).returning(_T.c.id, sort_by_parameter_order=True), list(rows)
        )
        return [int(i) for i in result.scalars()]

    def _block_publish(self, conn: Connection, children: int) -> None:
        if children:
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == self.publish_id)
                .values(blocked_by=_T.c.blocked_by + children)
            )

    # -- phases ------------------------------------------------------------------------

    def _fresh_statistics(self) -> None:
        """PostgreSQL: ANALYZE when the planner statistics predate this version's rows.

        A version registered a moment ago can outnumber everything the statistics saw;
        PostgreSQL then sorts the whole remaining manifest for every page instead of
        walking the index (measured: 3x slower per page at 100,000 entries).
        """
        if not is_postgresql(self.engine):
            return
        with self.engine.connect() as conn:
            seen = conn.execute(
                sa.text("SELECT reltuples FROM pg_class WHERE relname = 'entries'")
            ).scalar_one_or_none()
            files = conn.execute(
                sa.select(_V.c.files).where(_V.c.pk == self.version_pk)
            ).scalar_one()
        if seen is None or float(seen) < files:
            with self.engine.connect() as conn:
                conn.execute(sa.text("ANALYZE entries"))
                conn.execute(sa.text("ANALYZE replicas"))
                conn.commit()

    def start(self) -> None:
        self._fresh_statistics()
        present = (
            sa.select(sa.literal(1))
            .where(_R.c.site == self.dst, _R.c.digest == _E.c.digest, _R.c.state == "ok")
            .exists()
        )
        with write_transaction(self.engine) as conn:
            now = datetime.now(UTC)
            conn.execute(sa.delete(_T).where(_T.c.placement_id == self.placement_id))
            payload = {
                "placement_id": self.placement_id,
                "dst_site": self.dst,
                "dataset": self.dataset,
                "version_id": self.version_id,
            }
            # blocked_by=1: the planning hold, released by finish().
            (self.publish_id,) = self._insert(
                conn, [self._task("publish", payload, parent=None, blocked_by=1, now=now)]
            )
            files, nbytes = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(_E.c.size), 0)).where(
                    _E.c.version_pk == self.version_pk, present
                )
            ).one()
            totals = conn.execute(
                sa.select(_V.c.files, _V.c.bytes).where(_V.c.pk == self.version_pk)
            ).one()
            self.result.files_present, self.result.bytes_present = int(files), int(nbytes)
            conn.execute(
                sa.update(_P)
                .where(_P.c.id == self.placement_id)
                .values(
                    state="PLANNING",
                    error=None,
                    updated_at=now,
                    files_total=totals.files,
                    bytes_total=totals.bytes,
                    files_done=int(files),
                    bytes_done=int(nbytes),
                )
            )

    def _missing_page(self, conn: Connection, after: str) -> tuple[list[_Blob], dict[str, _Source]]:
        """The next page of missing blobs after digest ``after``, and each one's best source.

        Two index-driven statements, on purpose: the page walks ``entries (version_pk,
        digest)`` in order and stops at the LIMIT; the sources are point lookups in
        ``replicas (digest, state)``. Joined in one statement, PostgreSQL prefers hashing
        the whole replicas table, 50x slower per page at 100,000 replicas.
        """
        present = (
            sa.select(sa.literal(1))
            .where(_R.c.site == self.dst, _R.c.digest == _E.c.digest, _R.c.state == "ok")
            .exists()
        )
        rows = conn.execute(
            sa.select(
                _E.c.digest,
                sa.func.max(_E.c.size),
                sa.func.count(),
                sa.func.max(_E.c.chunks),
            )
            .where(_E.c.version_pk == self.version_pk, _E.c.digest > after, ~present)
            .group_by(_E.c.digest)
            .order_by(_E.c.digest)
            .limit(self.config.page_size)
        ).all()
        blobs = [_Blob(str(d), int(s), int(n), json.loads(c) if c else []) for d, s, n, c in rows]
        if not blobs:
            return [], {}
        digests = [b.digest for b in blobs]
        if is_postgresql(conn):  # one array parameter, not a thousand
            match = _R.c.digest == sa.any_(sa.literal(digests, postgresql.ARRAY(sa.String)))
        else:
            match = _R.c.digest.in_(digests)
        replicas = conn.execute(
            sa.select(_R.c.digest, _R.c.site, _R.c.key, _R.c.etag).where(
                match, _R.c.state == "ok", _R.c.site != self.dst
            )
        ).all()
        best: dict[str, tuple[tuple[float, str, bool, str], _Source]] = {}
        for digest, site, key, etag in replicas:
            if site not in self.settings.sites:
                continue  # a site this process cannot open
            # Prefer cheap links, then the blob store copy (immutable) over a source path.
            rank = (
                source_cost(self.settings, site, self.dst),
                site,
                not key.startswith(".datasync/"),
                key,
            )
            if digest not in best or rank < best[digest][0]:
                best[digest] = (rank, _Source(site, key, etag))
        return blobs, {d: s for d, (_, s) in best.items()}

    def page(self, after: str) -> str | None:
        """Plan one page of missing blobs after digest ``after``; return the last digest."""
        with write_transaction(self.engine) as conn:
            blobs, sources = self._missing_page(conn, after)
            if not blobs:
                return None
            self.result.pages += 1
            self.result.max_page_rows = max(self.result.max_page_rows, len(blobs))
            now = datetime.now(UTC)
            children = 0
            for blob in blobs:
                src = sources.get(blob.digest)
                if src is None:
                    self.result.no_source += 1
                    self.first_missing = self.first_missing or blob.digest
                    continue
                self.result.blobs += 1
                self.result.bytes_to_move += blob.size
                if blob.chunks and blob.size > self.chunk_size:
                    self._plan_chunks(conn, blob, src, now)
                    children += 1
                else:
                    self.batch.append((blob, src))
                    self.batch_bytes += blob.size
                    if (
                        len(self.batch) >= self.config.batch_items
                        or self.batch_bytes >= self.config.batch_bytes
                    ):
                        children += self._flush_batch(conn, now)
            self._block_publish(conn, children)
            conn.execute(sa.update(_P).where(_P.c.id == self.placement_id).values(updated_at=now))
            return blobs[-1].digest

    def _plan_chunks(self, conn: Connection, blob: _Blob, src: _Source, now: datetime) -> None:
        parts = len(blob.chunks)
        per = max(1, self.config.chunks_per_task)
        ranges = [(i, min(parts, i + per)) for i in range(0, parts, per)]
        common = {
            "dst_site": self.dst,
            "digest": blob.digest,
            "size": blob.size,
            "chunk_size": self.chunk_size,
            "src_site": src.site,
            "src_key": src.key,
            "src_etag": src.etag,
        }
        finalize = {**common, "parts_total": parts, "chunk_digests": blob.chunks}
        (finalize_id,) = self._insert(
            conn,
            [
                self._task(
                    "finalize",
                    finalize,
                    parent=self.publish_id,
                    blocked_by=len(ranges),
                    files=blob.files,
                    now=now,
                )
            ],
        )
        rows = []
        for first, last in ranges:
            span = min(blob.size, last * self.chunk_size) - first * self.chunk_size
            payload = {**common, "chunk_digests": blob.chunks, "first": first, "last": last}
            rows.append(
                self._task("chunks", payload, parent=finalize_id, nbytes=span * blob.files, now=now)
            )
        self._insert(conn, rows)

    def _flush_batch(self, conn: Connection, now: datetime) -> int:
        if not self.batch:
            return 0
        items = [
            {
                "digest": blob.digest,
                "size": blob.size,
                "src_site": src.site,
                "src_key": src.key,
                "src_etag": src.etag,
            }
            for blob, src in self.batch
        ]
        files = sum(blob.files for blob, _ in self.batch)
        nbytes = sum(blob.size * blob.files for blob, _ in self.batch)
        payload = {"dst_site": self.dst, "items": items}
        self._insert(
            conn,
            [
                self._task(
                    "blobs", payload, parent=self.publish_id, files=files, nbytes=nbytes, now=now
                )
            ],
        )
        self.batch, self.batch_bytes = [], 0
        return 1

    def finish(self) -> None:
        with write_transaction(self.engine) as conn:
            now = datetime.now(UTC)
            children = self._flush_batch(conn, now)
            # Add the last batch and release the planning hold in one step.
            conn.execute(
                sa.update(_T)
                .where(_T.c.id == self.publish_id)
                .values(blocked_by=_T.c.blocked_by + children - 1)
            )
            if self.result.no_source:
                path = conn.execute(
                    sa.select(sa.func.min(_E.c.path)).where(
                        _E.c.version_pk == self.version_pk, _E.c.digest == self.first_missing
                    )
                ).scalar_one()
                reason = (
                    f"{self.dataset}@{self.version_id[:12]}: {self.result.no_source} blob(s) have"
                    f" no ok replica at any configured site other than {self.dst!r}"
                    f" (first: {path}, {self.first_missing}); register the version from a"
                    " configured site or replicate it there first"
                )
                fail_placement(conn, self.placement_id, reason, now)
                self.result.state = "FAILED"
                return
            conn.execute(
                sa.update(_P)
                .where(_P.c.id == self.placement_id, _P.c.state == "PLANNING")
                .values(state="TRANSFERRING", updated_at=now)
            )


def plan_placement(
    engine: Engine,
    settings: Settings,
    placement_id: int,
    config: PlannerConfig | None = None,
) -> PlanResult:
    """(Re)plan ``placement_id``: replace its tasks with the ones its missing blobs need.

    Safe to run again after a crash at any point (it starts over; verified replicas are
    kept). The placement ends TRANSFERRING (or FAILED when a blob has no source).
    """
    planner = _Planner(engine, settings, placement_id, config or PlannerConfig())
    planner.start()
    after = ""
    while True:
        last = planner.page(after)
        if last is None:
            break
        after = last
    planner.finish()
    return planner.result
