"""SQLModel tables of the replication engine: replicas, placements, tasks, uploads, parts.

Only ``datasync.transfer.state`` writes ``replicas``, ``placements`` and ``tasks``
(``tests/unit/test_state_owner.py`` enforces it). Invariants the schema keeps:

* ``replicas`` is the site index. A row ``(site, digest, key)`` with ``state='ok'`` means
  the bytes of ``digest`` were verified at ``key`` on ``site``. ``kind`` says whose bytes
  they are: ``blob`` (the site's blob store, datasync's own, the only material of views)
  or ``source`` (a registration source's file, users' and mutable, only ever read and
  hashed). A ``bad`` row keeps its ``reason`` and is tried again as a source after
  ``recheck_after``.
* ``placements`` has one row per ``(version_pk, site)``: replicating twice is idempotent.
* ``tasks`` form a tree through ``parent_id``: chunk tasks -> their blob's finalize task ->
  the placement's publish task; blob batches -> publish. ``blocked_by`` counts children not
  yet done; only tasks with ``blocked_by = 0`` are claimable, and completing a child
  decrements its parent in the same transaction. The planner holds one extra count on the
  publish task while it plans, so publish cannot run on a half-planned placement.
* A task is ``leased`` only with ``lease_owner`` and ``lease_expires_at`` set. An expired
  lease is claimable again (the claim takes it over and counts an attempt).
* ``uploads`` holds at most one in-flight chunked write per ``(site, digest)``;
  ``upload_parts`` lists its verified parts (the chunk map used for resume on POSIX).
* ``blob_moves`` names the task last filed to move a blob to a site (the row is stale once
  that task is no longer queued or leased); ``blob_waits`` rows are placements waiting for
  another placement's task to move a blob they need instead of moving it again. Each wait
  holds one count in the waiter's publish ``blocked_by`` and one in the mover's
  ``waiters``, until the mover completes (the waiter is credited) or ends otherwise (the
  waiter is planned again).

Times are UTC, ``timestamp with time zone`` on PostgreSQL (naive UTC text on SQLite).
The partial indexes serve the two claim predicates and the planner's per-digest paging.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel, col

from datasync.db.tables import Entry, path_type
from datasync.models import PlacementState, ReplicaKind, ReplicaState, TaskState

__all__ = [
    "NO_DEADLINE",
    "TASK_KINDS",
    "BlobMove",
    "BlobWait",
    "Placement",
    "Replica",
    "SitePause",
    "Task",
    "Upload",
    "UploadPart",
]

# Mirrors ``datasync.transfer.payloads.TaskKind`` (a test checks they agree); the schema
# cannot import the engine.
TASK_KINDS = ("blobs", "chunks", "finalize", "publish", "labels")

# A task's deadline when its placement has none (sorts after every real deadline).
NO_DEADLINE = datetime(9999, 12, 31, tzinfo=UTC)

# BIGINT ids on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...] | type[Any]) -> str:
    names = tuple(str(v) for v in values)
    return f"{column} IN ({', '.join(repr(v) for v in names)})"


def _partial(name: str, *columns: Any, where: str) -> sa.Index:
    return sa.Index(name, *columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


class Replica(SQLModel, table=True):
    __tablename__ = "replicas"
    __table_args__ = (
        sa.CheckConstraint(_in("state", ReplicaState), name="ck_replicas_state"),
        sa.CheckConstraint(_in("kind", ReplicaKind), name="ck_replicas_kind"),
        # sources_for(digest) and the planner's "already at the destination" probe.
        sa.Index("ix_replicas_digest_state", "digest", "state"),
    )

    site: str = Field(primary_key=True, sa_type=sa.String(64))
    digest: str = Field(primary_key=True, sa_type=sa.String(64))
    key: str = Field(primary_key=True, sa_type=path_type())
    kind: str = Field(sa_type=sa.String(8), nullable=False)
    size: int = Field(sa_type=sa.BigInteger, nullable=False)
    state: str = Field(default=ReplicaState.OK, sa_type=sa.String(8), nullable=False)
    # Version token of the stored object (ETag, generation, mtime-ino) to pin source reads
    # and to notice a blob changed behind our back (publish compares it with a stat).
    etag: str | None = Field(default=None, sa_type=sa.Text)
    verified_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    reason: str | None = Field(default=None, sa_type=sa.Text)
    # A bad source is tried again (last) once this time has passed: bad is not forever.
    recheck_after: datetime | None = Field(default=None, sa_type=_TS)


class Placement(SQLModel, table=True):
    __tablename__ = "placements"
    __table_args__ = (
        sa.UniqueConstraint("version_pk", "site", name="uq_placements_version_site"),
        sa.CheckConstraint(_in("state", PlacementState), name="ck_placements_state"),
        sa.Index("ix_placements_state", "state"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    dataset: str = Field(sa_type=path_type(), nullable=False)
    # No cascade: a version with placements must be unpublished before it can go.
    version_pk: int = Field(foreign_key="versions.pk", sa_type=sa.Integer, nullable=False)
    version_id: str = Field(sa_type=sa.String(64), nullable=False)
    site: str = Field(sa_type=sa.String(64), nullable=False)
    priority: int = Field(default=0, sa_type=sa.Integer, nullable=False)
    deadline: datetime | None = Field(default=None, sa_type=_TS)
    state: str = Field(default=PlacementState.PLANNING, sa_type=sa.String(16), nullable=False)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    updated_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    error: str | None = Field(default=None, sa_type=sa.Text)
    # Logical progress: files/bytes of the version whose blobs are replicas at the site.
    files_total: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    bytes_total: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    files_done: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    bytes_done: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    # Who asked: "operator", "policy:<name>" or "stage" (the first to create it).
    origin: str = Field(default="operator", sa_type=sa.String(160), nullable=False)
    # When a job last asked for it (stage) or it was published: LRU order for eviction.
    last_used_at: datetime | None = Field(default=None, sa_type=_TS)
    # The ETA passes the deadline (set by the scheduler; its tasks are boosted meanwhile).
    at_risk: bool = Field(default=False, sa_type=sa.Boolean, nullable=False)


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", TASK_KINDS), name="ck_tasks_kind"),
        sa.CheckConstraint(_in("state", TaskState), name="ck_tasks_state"),
        sa.Index("ix_tasks_placement_state", "placement_id", "state"),
        # Claim path 2: leases that may have expired.
        _partial("ix_tasks_claim_leased", "lease_expires_at", where="state = 'leased'"),
        # Throughput over recent completions.
        _partial("ix_tasks_finished", "placement_id", "finished_at", where="state = 'done'"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    placement_id: int = Field(
        foreign_key="placements.id", ondelete="CASCADE", sa_type=_ID, nullable=False
    )
    # The task this one unblocks when done (finalize for chunks, publish for the rest).
    parent_id: int | None = Field(
        default=None, foreign_key="tasks.id", ondelete="CASCADE", sa_type=_ID
    )
    kind: str = Field(sa_type=sa.String(16), nullable=False)
    state: str = Field(default=TaskState.QUEUED, sa_type=sa.String(16), nullable=False)
    priority: int = Field(default=0, sa_type=sa.Integer, nullable=False)
    # NO_DEADLINE when none: NOT NULL columns let "ASC NULLS LAST" use the claim index on
    # SQLite too (where NULLs sort first).
    deadline: datetime = Field(default=NO_DEADLINE, sa_type=_TS, nullable=False)
    # The latest time this task can start and its placement still meet its deadline:
    # deadline - remaining bytes / link throughput (the scheduler keeps it current). The
    # claim takes the smallest first: least slack, then priority, then age.
    latest_start: datetime = Field(
        default=NO_DEADLINE,
        sa_type=_TS,
        nullable=False,
        sa_column_kwargs={"server_default": sa.text("'9999-12-31 00:00:00+00:00'")},
    )
    # The link it moves bytes on (None for publish/labels), and when its attempt began.
    src_site: str | None = Field(default=None, sa_type=sa.String(64))
    dst_site: str | None = Field(default=None, sa_type=sa.String(64))
    started_at: datetime | None = Field(default=None, sa_type=_TS)
    # Bytes the task will move on its link (physical: a blob under three paths counts once).
    move_bytes: int = Field(
        default=0, sa_type=sa.BigInteger, nullable=False, sa_column_kwargs={"server_default": "0"}
    )
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    not_before: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    blocked_by: int = Field(default=0, sa_type=sa.Integer, nullable=False)
    attempts: int = Field(default=0, sa_type=sa.Integer, nullable=False)
    max_attempts: int = Field(default=8, sa_type=sa.Integer, nullable=False)
    lease_owner: str | None = Field(default=None, sa_type=sa.String(255))
    lease_expires_at: datetime | None = Field(default=None, sa_type=_TS)
    # A payload of ``datasync.transfer.payloads`` (``encode``/``decode`` there).
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    # [{"at": iso8601, "class": "TransientError", "message": "..."}], oldest first.
    errors: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON, nullable=False)
    # Logical progress this task completes (files = paths whose blob it finishes).
    files: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    bytes: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    # Bytes actually written by the worker (0 when the blob was already there).
    bytes_moved: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    # Blob waits of other placements on this task (``blob_waits``): completing spares the
    # lookup when there are none.
    waiters: int = Field(
        default=0, sa_type=sa.Integer, nullable=False, sa_column_kwargs={"server_default": "0"}
    )


class Upload(SQLModel, table=True):
    __tablename__ = "uploads"

    site: str = Field(primary_key=True, sa_type=sa.String(64))
    digest: str = Field(primary_key=True, sa_type=sa.String(64))
    token: str = Field(sa_type=sa.Text, nullable=False)
    part_size: int = Field(sa_type=sa.BigInteger, nullable=False)
    parts_total: int = Field(sa_type=sa.Integer, nullable=False)
    state: str = Field(default="open", sa_type=sa.String(16), nullable=False)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)


class UploadPart(SQLModel, table=True):
    __tablename__ = "upload_parts"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["site", "digest"], ["uploads.site", "uploads.digest"], ondelete="CASCADE"
        ),
    )

    site: str = Field(primary_key=True, sa_type=sa.String(64))
    digest: str = Field(primary_key=True, sa_type=sa.String(64))
    idx: int = Field(primary_key=True, sa_type=sa.Integer)
    # What the store showed for the part (``SupportsPartProofs``): lets the writer that
    # commits the upload prove the object without re-reading it. NULL: re-read.
    proof: str | None = Field(default=None, sa_type=sa.Text)


class BlobMove(SQLModel, table=True):
    """The task last filed to move ``digest`` into ``site``'s blob store."""

    __tablename__ = "blob_moves"

    site: str = Field(primary_key=True, sa_type=sa.String(64))
    digest: str = Field(primary_key=True, sa_type=sa.String(64))
    task_id: int = Field(
        foreign_key="tasks.id", ondelete="CASCADE", sa_type=_ID, nullable=False, index=True
    )


class BlobWait(SQLModel, table=True):
    """A placement waiting for another's task to move a blob it needs."""

    __tablename__ = "blob_waits"

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    # SET NULL, not CASCADE: a deleted mover leaves the wait behind, to be settled.
    mover_id: int | None = Field(
        default=None, foreign_key="tasks.id", ondelete="SET NULL", sa_type=_ID, index=True
    )
    publish_id: int = Field(
        foreign_key="tasks.id", ondelete="CASCADE", sa_type=_ID, nullable=False, index=True
    )
    placement_id: int = Field(
        foreign_key="placements.id", ondelete="CASCADE", sa_type=_ID, nullable=False
    )
    digest: str = Field(sa_type=sa.String(64), nullable=False)
    files: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    bytes: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)


# Claim path 1: queued and unblocked, in claim order. Partial, so it stays small.
_partial(
    "ix_tasks_claim_queued",
    col(Task.latest_start),
    col(Task.priority).desc(),
    col(Task.created_at),
    col(Task.id),
    where="state = 'queued' AND blocked_by = 0",
)
# Link throughput over recent completions (the scheduler's measurement).
_partial(
    "ix_tasks_link_finished",
    col(Task.dst_site),
    col(Task.finished_at),
    where="state = 'done'",
)
# The planner pages a version's distinct digests in digest order (dedupe is adjacency).
sa.Index("ix_entries_version_digest", col(Entry.version_pk), col(Entry.digest))


class SitePause(SQLModel, table=True):
    """An operator paused ``site``: no task reading from or writing to it is claimed until
    ``until`` (or ``datasync resume``); tasks already running finish."""

    __tablename__ = "site_pauses"

    site: str = Field(primary_key=True, sa_type=sa.String(64))
    until: datetime = Field(sa_type=_TS, nullable=False)
    reason: str = Field(sa_type=sa.Text, nullable=False)
    paused_by: str = Field(sa_type=sa.String(128), nullable=False)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
