"""SQLModel tables of staging, scheduling, policies, workers and API tokens.

* ``stage_requests``: a job's request for a version at a site, one per ``(job_id,
  placement_id)`` (idempotent); it holds a pin until released.
* ``pins``: what keeps a placement's view from eviction: ``holder`` is ``job:<id>``,
  ``policy:<name>`` or ``operator``; a pin past ``expires_at`` no longer counts.
* ``link_stats``: observed throughput per ``(src, dst)`` link, an exponentially weighted
  average over completed tasks, for ETAs and deadline slack.
* ``policies``: declarative placement policies as applied (``datasync policy apply``).
* ``workers``: one row per live worker process, its heartbeat (``last_seen``) and load.
* ``api_tokens``: hashed API tokens with a role and, for owners, their namespaces.

Only the state owner writes stage requests, pins and link statistics.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

__all__ = [
    "ApiToken",
    "LinkStat",
    "Pin",
    "PlacementHistory",
    "PolicyRow",
    "StageRequest",
    "WorkerRow",
]

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StageRequest(SQLModel, table=True):
    __tablename__ = "stage_requests"
    __table_args__ = (sa.UniqueConstraint("job_id", "placement_id", name="uq_stage_job_placement"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    job_id: str = Field(sa_type=sa.String(255), nullable=False, index=True)
    placement_id: int = Field(
        foreign_key="placements.id", ondelete="CASCADE", sa_type=_ID, nullable=False
    )
    deadline: datetime | None = Field(default=None, sa_type=_TS)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    released_at: datetime | None = Field(default=None, sa_type=_TS)


class Pin(SQLModel, table=True):
    __tablename__ = "pins"

    placement_id: int = Field(
        foreign_key="placements.id", ondelete="CASCADE", primary_key=True, sa_type=_ID
    )
    holder: str = Field(primary_key=True, sa_type=sa.String(255))
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    expires_at: datetime | None = Field(default=None, sa_type=_TS)


class PlacementHistory(SQLModel, table=True):
    """Every state a placement entered, and when: ``explain``'s per-phase timings."""

    __tablename__ = "placement_history"

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    placement_id: int = Field(
        foreign_key="placements.id", ondelete="CASCADE", sa_type=_ID, nullable=False, index=True
    )
    state: str = Field(sa_type=sa.String(16), nullable=False)
    at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    note: str | None = Field(default=None, sa_type=sa.Text)


class LinkStat(SQLModel, table=True):
    __tablename__ = "link_stats"

    src_site: str = Field(primary_key=True, sa_type=sa.String(64))
    dst_site: str = Field(primary_key=True, sa_type=sa.String(64))
    bytes_per_second: float = Field(sa_type=sa.Float, nullable=False)
    samples: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    updated_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    # Reads from the source failed for good recently: the planner and readers avoid the
    # link until then (another source first).
    penalty_until: datetime | None = Field(default=None, sa_type=_TS)


class PolicyRow(SQLModel, table=True):
    __tablename__ = "policies"

    name: str = Field(primary_key=True, sa_type=sa.String(128))
    document: dict[str, Any] = Field(sa_type=sa.JSON, nullable=False)
    applied_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)


class WorkerRow(SQLModel, table=True):
    __tablename__ = "workers"

    owner: str = Field(primary_key=True, sa_type=sa.String(255))
    host: str = Field(sa_type=sa.String(255), nullable=False)
    pid: int = Field(sa_type=sa.Integer, nullable=False)
    started_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    last_seen: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    tasks_running: int = Field(default=0, sa_type=sa.Integer, nullable=False)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    name: str = Field(sa_type=sa.String(128), nullable=False, unique=True)
    # sha256 hex of the token; the token itself is shown once and never stored.
    token_hash: str = Field(sa_type=sa.String(64), nullable=False, unique=True)
    role: str = Field(sa_type=sa.String(16), nullable=False)
    namespaces: list[str] = Field(default_factory=list, sa_type=sa.JSON, nullable=False)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=_TS, nullable=False)
    expires_at: datetime | None = Field(default=None, sa_type=_TS)
    revoked_at: datetime | None = Field(default=None, sa_type=_TS)
    last_used_at: datetime | None = Field(default=None, sa_type=_TS)
