"""The planner: placement "version V at site S" -> tasks for ``manifest - site's blob store``.

How it plans (Rucio derives transfers from rules the same way):

1. ``begin_planning``: drop the placement's old tasks (a re-plan after a crash or a retry
   starts clean; replicas earlier tasks recorded stay, so nothing verified moves twice),
   insert the ``publish`` task holding one *planning* count in ``blocked_by``, and count
   the files and bytes already in the site's blob store (when the first page of step 2
   holds every missing blob, as for an incremental version, they follow from the
   version's totals minus that page, without a second pass over the manifest).
2. Page through the version's *distinct* digests not yet an ``ok`` blob replica at the
   site, in digest order (``entries (version_pk, digest)`` index; duplicates are adjacent,
   so one digest under many paths is one blob, and keyset paging never revisits a digest).
   Blobs the site holds for ANY version are skipped.
3. Blobs another placement's queued or leased task is already moving to the site are not
   moved again: the placement waits for that task (``transfer/state/sharing.py``).
   For each other blob, choose a source (``SourceRanking``): ok replicas before bad ones
   whose re-check time has come, links not penalized after recent failures first; then
   cost and speed, subject to the deadline: the cheapest source whose link can still move
   the placement's bytes before its deadline (by the link's observed throughput), else,
   when none can, the fastest; without a deadline, the cheapest and then the fastest (a
   source at the destination itself costs nothing); then blob-store copies (immutable)
   before registration sources, then site and key. A registration source AT the
   destination site is a source like any other: its bytes are copied into the blob store
   and verified there, never linked into a view. A blob larger than one chunk gets
   ``chunks`` tasks of ``chunks_per_task`` chunks each under one ``finalize``; small blobs
   are batched into ``blobs`` tasks (at most ``batch_items`` items or ``batch_bytes``).
4. ``finish_planning`` releases the planning hold: TRANSFERRING, or FAILED when some blob
   has no source anywhere, saying how many and which one first.

Memory is bounded by one page plus one open batch, whatever the manifest size; each page
is one short write transaction (through the state owner), so workers start on early
tasks while planning goes on. The planner itself only reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from datasync.config import Settings
from datasync.db.engine import is_postgresql
from datasync.db.tables import Entry, Version
from datasync.db.transfer_tables import Placement, Replica
from datasync.errors import UserError
from datasync.events import PlacementPlanned
from datasync.models import ReplicaKind, ReplicaState
from datasync.transfer.links import Links, load_links
from datasync.transfer.payloads import (
    BlobItem,
    BlobsPayload,
    ChunkedBlob,
    ChunksPayload,
    FinalizePayload,
    PublishPayload,
    SourceRef,
    kind_of,
)
from datasync.transfer.siteindex import present_at, source_rows
from datasync.transfer.state import BlobWant, EngineState, NewTask, as_utc

__all__ = ["PlanResult", "Planner", "PlannerConfig", "SourceRanking"]

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
    blobs_shared: int = 0  # in flight for another placement: waited for, not moved again
    state: str = "TRANSFERRING"


@dataclass(slots=True)
class _Blob:
    digest: str
    size: int
    files: int  # paths of the version holding this digest
    chunks: tuple[str, ...]


class SourceRanking:
    """Orders candidate source replicas of one placement (smaller sorts first)."""

    def __init__(
        self, links: Links, dst: str, deadline: datetime | None, remaining: int, now: datetime
    ) -> None:
        self.links = links
        self.dst = dst
        self.deadline = deadline
        self.remaining = remaining
        self.now = now

    def key(
        self, site: str, key: str, kind: str, state: str
    ) -> tuple[bool, bool, int, float, float, bool, str, str]:
        cost = self.links.cost(site, self.dst)
        rate = self.links.rate(site, self.dst)
        seconds = self.remaining / rate
        late = self.deadline is not None and self.now + timedelta(seconds=seconds) > self.deadline
        # In time: the cheapest, then the fastest. Too late whatever: the fastest.
        first, second = (seconds, cost) if late else (cost, seconds)
        return (
            state != ReplicaState.OK,
            self.links.penalized(site, self.dst, self.now),
            int(late),
            first,
            second,
            kind != ReplicaKind.BLOB,
            site,
            key,
        )


class _Plan:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        state: EngineState,
        placement_id: int,
        config: PlannerConfig,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = state
        self.config = config
        self.placement_id = placement_id
        self.result = PlanResult(placement_id)
        self.batch: list[BlobItem] = []
        self.batch_files = 0
        self.batch_bytes = 0
        self.batch_logical = 0
        self.first_missing: str | None = None
        self.first_page: list[_Blob] | None = None  # read by ``start``, planned by ``page``
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    col(Placement.version_pk),
                    col(Placement.site),
                    col(Placement.dataset),
                    col(Placement.version_id),
                    col(Version.chunk_size),
                    col(Version.files),
                    col(Version.bytes),
                )
                .add_columns(col(Placement.deadline))
                .join(Version, col(Version.pk) == col(Placement.version_pk))
                .where(col(Placement.id) == placement_id)
            ).one_or_none()
        if row is None:
            raise UserError(f"placement {placement_id} does not exist")
        if row.site not in settings.sites:
            raise UserError(f"placement {placement_id}: site {row.site!r} is not configured")
        self.version_pk: int = row.version_pk
        self.dst: str = row.site
        self.dataset: str = row.dataset
        self.version_id: str = row.version_id
        self.chunk_size: int = row.chunk_size
        self.totals = (int(row.files), int(row.bytes))
        self.deadline = as_utc(row.deadline)
        self.publish_id = 0
        self.links = load_links(engine, settings)
        self.ranking = SourceRanking(self.links, self.dst, self.deadline, 0, datetime.now(UTC))

    def _count(self, kind: str, n: int = 1) -> None:
        self.result.tasks[kind] = self.result.tasks.get(kind, 0) + n

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
            if seen is None or float(seen) < self.totals[0]:
                conn.execute(sa.text("ANALYZE entries"))
                conn.execute(sa.text("ANALYZE replicas"))
                conn.commit()

    def start(self) -> None:
        self._fresh_statistics()
        with self.engine.connect() as conn:
            self.first_page = self._missing_blobs(conn, "")
            if len(self.first_page) < self.config.page_size:
                # All that is missing is on this page (an incremental version): what is
                # present follows from the version's totals, without a second pass.
                files = self.totals[0] - sum(b.files for b in self.first_page)
                nbytes = self.totals[1] - sum(b.size * b.files for b in self.first_page)
            else:
                files, nbytes = conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.coalesce(sa.func.sum(col(Entry.size)), 0)
                    ).where(col(Entry.version_pk) == self.version_pk, present_at(self.dst))
                ).one()
        self.result.files_present, self.result.bytes_present = int(files), int(nbytes)
        self.ranking.remaining = max(1, self.totals[1] - int(nbytes))
        publish = PublishPayload(self.placement_id, self.dst, self.dataset, self.version_id)
        self.publish_id = self.state.placements.begin_planning(
            self.placement_id,
            publish,
            max_attempts=self.config.max_attempts,
            totals=self.totals,
            present=(int(files), int(nbytes)),
        )
        self._count(kind_of(publish))

    def _missing_page(
        self, conn: Connection, after: str
    ) -> tuple[list[_Blob], dict[str, SourceRef]]:
        """The next page of missing blobs after digest ``after``, and each one's best source.

        Two index-driven statements, on purpose: the page walks ``entries (version_pk,
        digest)`` in order and stops at the LIMIT; the sources are point lookups in
        ``replicas (digest, state)``. Joined in one statement, PostgreSQL prefers hashing
        the whole replicas table, 50x slower per page at 100,000 replicas.
        """
        if after == "" and self.first_page is not None:
            blobs, self.first_page = self.first_page, None
        else:
            blobs = self._missing_blobs(conn, after)
        if not blobs:
            return [], {}
        return blobs, self._sources(conn, blobs)

    def _missing_blobs(self, conn: Connection, after: str) -> list[_Blob]:
        rows = conn.execute(
            sa.select(
                col(Entry.digest),
                sa.func.max(col(Entry.size)),
                sa.func.count(),
                sa.func.max(col(Entry.chunks)),
            )
            .where(
                col(Entry.version_pk) == self.version_pk,
                col(Entry.digest) > after,
                ~present_at(self.dst),
            )
            .group_by(col(Entry.digest))
            .order_by(col(Entry.digest))
            .limit(self.config.page_size)
        ).all()
        return [
            _Blob(str(d), int(s), int(n), tuple(json.loads(c)) if c else ()) for d, s, n, c in rows
        ]

    def _sources(self, conn: Connection, blobs: list[_Blob]) -> dict[str, SourceRef]:
        digests = [b.digest for b in blobs]
        if is_postgresql(conn):  # one array parameter, not a thousand
            match = col(Replica.digest) == sa.any_(sa.literal(digests, postgresql.ARRAY(sa.String)))
        else:
            match = col(Replica.digest).in_(digests)
        # The destination's own blob store is what is missing; its sources count.
        replicas = conn.execute(source_rows(match, self.dst, datetime.now(UTC))).all()
        best: dict[str, tuple[tuple[bool, bool, int, float, float, bool, str, str], SourceRef]]
        best = {}
        for digest, site, key, etag, kind, state in replicas:
            if site not in self.settings.sites:
                continue  # a site this process cannot open
            rank = self.ranking.key(site, key, kind, state)
            if digest not in best or rank < best[digest][0]:
                best[digest] = (rank, SourceRef(site, key, etag))
        return {d: s for d, (_, s) in best.items()}

    def page(self, after: str) -> str | None:
        """Plan one page of missing blobs after digest ``after``; return the last digest."""
        with self.engine.connect() as conn:
            blobs, sources = self._missing_page(conn, after)
        if not blobs:
            return None
        self.result.pages += 1
        self.result.max_page_rows = max(self.result.max_page_rows, len(blobs))
        # Blobs another placement's task is moving here already: wait for them instead.
        movers = self.state.sharing.in_flight(
            self.dst, [b.digest for b in blobs], self.placement_id
        )
        shared = {b.digest: b for b in blobs if b.digest in movers}
        wants = [
            BlobWant(b.digest, b.files, b.size * b.files, movers[b.digest]) for b in shared.values()
        ]
        self.result.blobs_shared += len(wants)
        tasks: list[NewTask] = []
        for blob in blobs:
            if blob.digest not in shared:
                self._plan_blob(blob, sources.get(blob.digest), tasks)
        gone = self._add(tasks, wants)
        if gone:  # their movers ended meanwhile: move them here after all
            self.result.blobs_shared -= len(gone)
            tasks = []
            for want in gone:
                self._plan_blob(shared[want.digest], sources.get(want.digest), tasks)
            self._add(tasks)
        return blobs[-1].digest

    def _plan_blob(self, blob: _Blob, src: SourceRef | None, tasks: list[NewTask]) -> None:
        """File the blob: its own chunked task tree, or into the open batch."""
        if src is None:
            self.result.no_source += 1
            self.first_missing = self.first_missing or blob.digest
            return
        self.result.blobs += 1
        self.result.bytes_to_move += blob.size
        if blob.chunks and blob.size > self.chunk_size:
            tasks.append(self._chunked(blob, src))
            return
        self.batch.append(BlobItem(blob.digest, blob.size, src))
        self.batch_files += blob.files
        self.batch_bytes += blob.size
        self.batch_logical += blob.size * blob.files
        if (
            len(self.batch) >= self.config.batch_items
            or self.batch_bytes >= self.config.batch_bytes
        ):
            tasks.append(self._flush())

    def _add(self, tasks: Sequence[NewTask], wants: Sequence[BlobWant] = ()) -> list[BlobWant]:
        if not (tasks or wants):
            return []
        return self.state.placements.add_tasks(
            self.placement_id,
            self.publish_id,
            tasks,
            max_attempts=self.config.max_attempts,
            wants=wants,
        )

    def _chunked(self, blob: _Blob, src: SourceRef) -> NewTask:
        big = ChunkedBlob(self.dst, blob.digest, blob.size, self.chunk_size, blob.chunks, src)
        per = max(1, self.config.chunks_per_task)
        parts = len(blob.chunks)
        children = []
        for first in range(0, parts, per):
            last = min(parts, first + per)
            span = min(blob.size, last * self.chunk_size) - first * self.chunk_size
            children.append(
                NewTask(ChunksPayload(big, first, last), nbytes=span * blob.files, move_bytes=span)
            )
        self._count("chunks", len(children))
        self._count("finalize")
        return NewTask(FinalizePayload(big), files=blob.files, children=tuple(children))

    def _flush(self) -> NewTask:
        task = NewTask(
            BlobsPayload(self.dst, tuple(self.batch)),
            files=self.batch_files,
            nbytes=self.batch_logical,
            move_bytes=self.batch_bytes,
        )
        self._count("blobs")
        self.batch, self.batch_files, self.batch_bytes, self.batch_logical = [], 0, 0, 0
        return task

    def finish(self) -> None:
        if self.batch:
            self._add([self._flush()])
        failure = None
        if self.result.no_source:
            with self.engine.connect() as conn:
                path = conn.execute(
                    sa.select(sa.func.min(col(Entry.path))).where(
                        col(Entry.version_pk) == self.version_pk,
                        col(Entry.digest) == self.first_missing,
                    )
                ).scalar_one()
            failure = (
                f"{self.dataset}@{self.version_id[:12]}: {self.result.no_source} blob(s) have"
                f" no usable replica at any configured site (first: {path},"
                f" {self.first_missing}); register the version again from where its files"
                " are, name them with --from SITE:prefix, or replicate it from a site that"
                " holds it"
            )
        planned = PlacementPlanned(
            placement_id=self.placement_id,
            site=self.dst,
            tasks=dict(self.result.tasks),
            blobs=self.result.blobs,
            bytes_to_move=self.result.bytes_to_move,
            files_present=self.result.files_present,
            bytes_present=self.result.bytes_present,
        )
        final = self.state.placements.finish_planning(
            self.placement_id, self.publish_id, planned, failure=failure
        )
        self.result.state = str(final)


class Planner:
    """Plans placements into tasks. One per process; thread-safe (no shared mutable state)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        state: EngineState,
        config: PlannerConfig | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = state
        self.config = config or PlannerConfig()

    def plan(self, placement_id: int, config: PlannerConfig | None = None) -> PlanResult:
        """(Re)plan ``placement_id``: replace its tasks with the ones its missing blobs need.

        Safe to run again after a crash at any point (it starts over; verified replicas
        are kept). The placement ends TRANSFERRING (or FAILED when a blob has no source).
        """
        plan = _Plan(self.engine, self.settings, self.state, placement_id, config or self.config)
        plan.start()
        after = ""
        while (last := plan.page(after)) is not None:
            after = last
        plan.finish()
        return plan.result
