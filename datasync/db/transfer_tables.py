"""SQLModel tables of the replication engine: replicas, placements, tasks, uploads, parts.

Invariants the schema keeps (the queue and planner rely on them):

* ``replicas`` is the site index. A row ``(site, digest, key)`` with ``state='ok'`` means the
  bytes of ``digest`` were verified at ``key`` on ``site``. ``key`` is explicit because a
  version's registration source holds its files under their paths, not in the blob store.
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

Times are UTC, ``timestamp with time zone`` on PostgreSQL (naive UTC text on SQLite).
The partial indexes serve the two claim predicates and the planner's per-digest paging.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from datasync.db.tables import Entry, path_type

__all__ = [
    "NO_DEADLINE",
    "PLACEMENT_STATES",
    "TASK_KINDS",
    "TASK_STATES",
    "Placement",
    "Replica",
    "Task",
    "Upload",
    "UploadPart",
]

PLACEMENT_STATES = ("PLANNING", "TRANSFERRING", "PUBLISHING", "READY", "FAILED")
TASK_KINDS = ("blobs", "chunks", "finalize", "publish")
TASK_STATES = ("queued", "leased", "done", "failed")

# A task's deadline when its placement has none (sorts after every real deadline).
NO_DEADLINE = datetime(9999, 12, 31, tzinfo=UTC)

# BIGINT ids on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Replica(SQLModel, table=True):
    __tablename__ = "replicas"
    __table_args__ = (
        sa.CheckConstraint("state IN ('ok', 'bad')", name="ck_replicas_state"),
        # sources_for(digest) and the planner's "already at the destination" probe.
        sa.Index("ix_replicas_digest_state", "digest", "state"),
    )

    site: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    digest: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    key: str = Field(sa_column=sa.Column(path_type(), primary_key=True))
    size: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    state: str = Field(default="ok", sa_column=sa.Column(sa.String(8), nullable=False))
    # Version token of the stored object (ETag, generation, mtime-ino) to pin source reads.
    etag: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    verified_at: datetime = Field(
        default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False)
    )
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


class Placement(SQLModel, table=True):
    __tablename__ = "placements"
    __table_args__ = (
        sa.UniqueConstraint("version_pk", "site", name="uq_placements_version_site"),
        sa.CheckConstraint(_in("state", PLACEMENT_STATES), name="ck_placements_state"),
        sa.Index("ix_placements_state", "state"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(_ID, primary_key=True))
    dataset: str = Field(sa_column=sa.Column(path_type(), nullable=False))
    # No cascade: a version with placements must be unpublished before it can go.
    version_pk: int = Field(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("versions.pk"), nullable=False)
    )
    version_id: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    site: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    priority: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    deadline: datetime | None = Field(default=None, sa_column=sa.Column(_TS, nullable=True))
    state: str = Field(default="PLANNING", sa_column=sa.Column(sa.String(16), nullable=False))
    created_at: datetime = Field(default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False))
    updated_at: datetime = Field(default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    # Logical progress: files/bytes of the version whose blobs are replicas at the site.
    files_total: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    bytes_total: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    files_done: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    bytes_done: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", TASK_KINDS), name="ck_tasks_kind"),
        sa.CheckConstraint(_in("state", TASK_STATES), name="ck_tasks_state"),
        sa.Index("ix_tasks_placement_state", "placement_id", "state"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(_ID, primary_key=True))
    placement_id: int = Field(
        sa_column=sa.Column(_ID, sa.ForeignKey("placements.id", ondelete="CASCADE"), nullable=False)
    )
    # The task this one unblocks when done (finalize for chunks, publish for the rest).
    parent_id: int | None = Field(
        default=None,
        sa_column=sa.Column(_ID, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True),
    )
    kind: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    state: str = Field(default="queued", sa_column=sa.Column(sa.String(16), nullable=False))
    priority: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    # NO_DEADLINE when none: a NOT NULL column lets "deadline ASC NULLS LAST" use the claim
    # index on SQLite too (where NULLs sort first).
    deadline: datetime = Field(default=NO_DEADLINE, sa_column=sa.Column(_TS, nullable=False))
    created_at: datetime = Field(default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False))
    not_before: datetime = Field(default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False))
    blocked_by: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    max_attempts: int = Field(default=8, sa_column=sa.Column(sa.Integer, nullable=False))
    lease_owner: str | None = Field(default=None, sa_column=sa.Column(sa.String(255)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=sa.Column(_TS))
    payload: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False)
    )
    # [{"at": iso8601, "class": "TransientError", "message": "..."}], oldest first.
    errors: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False)
    )
    # Logical progress this task completes (files = paths whose blob it finishes).
    files: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    bytes: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    # Bytes actually written by the worker (0 when the blob was already there).
    bytes_moved: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=sa.Column(_TS))


_tasks = Task.__table__  # type: ignore[attr-defined]

# Claim path 1: queued and unblocked, in claim order. Partial, so it stays small.
sa.Index(
    "ix_tasks_claim_queued",
    _tasks.c.priority.desc(),
    _tasks.c.deadline,
    _tasks.c.created_at,
    _tasks.c.id,
    postgresql_where=sa.text("state = 'queued' AND blocked_by = 0"),
    sqlite_where=sa.text("state = 'queued' AND blocked_by = 0"),
)
# Claim path 2: leases that may have expired.
sa.Index(
    "ix_tasks_claim_leased",
    _tasks.c.lease_expires_at,
    postgresql_where=sa.text("state = 'leased'"),
    sqlite_where=sa.text("state = 'leased'"),
)
# Throughput over recent completions.
sa.Index(
    "ix_tasks_finished",
    _tasks.c.placement_id,
    _tasks.c.finished_at,
    postgresql_where=sa.text("state = 'done'"),
    sqlite_where=sa.text("state = 'done'"),
)
# The planner pages a version's distinct digests in digest order (dedupe is adjacency).
sa.Index(
    "ix_entries_version_digest",
    Entry.__table__.c.version_pk,  # type: ignore[attr-defined]
    Entry.__table__.c.digest,  # type: ignore[attr-defined]
)


class Upload(SQLModel, table=True):
    __tablename__ = "uploads"

    site: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    digest: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    part_size: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    parts_total: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    state: str = Field(default="open", sa_column=sa.Column(sa.String(16), nullable=False))
    created_at: datetime = Field(default_factory=_utc_now, sa_column=sa.Column(_TS, nullable=False))


class UploadPart(SQLModel, table=True):
    __tablename__ = "upload_parts"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["site", "digest"], ["uploads.site", "uploads.digest"], ondelete="CASCADE"
        ),
    )

    site: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    digest: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    idx: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
