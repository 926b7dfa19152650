"""Replication engine: replicas, placements, tasks, uploads, upload_parts.

Also indexes ``entries (version_pk, digest)`` so the planner pages a version's distinct
digests without sorting the whole manifest. Mirrors ``datasync/db/transfer_tables.py``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _path() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _partial(name: str, table: str, columns: list[sa.TextClause | str], where: str) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("key", _path(), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("etag", sa.Text, nullable=True),
        sa.Column("verified_at", _TS, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.CheckConstraint("state IN ('ok', 'bad')", name="ck_replicas_state"),
    )
    op.create_index("ix_replicas_digest_state", "replicas", ["digest", "state"])

    op.create_table(
        "placements",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("dataset", _path(), nullable=False),
        sa.Column("version_pk", sa.Integer, sa.ForeignKey("versions.pk"), nullable=False),
        sa.Column("version_id", sa.String(64), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("deadline", _TS, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("files_total", sa.BigInteger, nullable=False),
        sa.Column("bytes_total", sa.BigInteger, nullable=False),
        sa.Column("files_done", sa.BigInteger, nullable=False),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("version_pk", "site", name="uq_placements_version_site"),
        sa.CheckConstraint(
            "state IN ('PLANNING', 'TRANSFERRING', 'PUBLISHING', 'READY', 'FAILED')",
            name="ck_placements_state",
        ),
    )
    op.create_index("ix_placements_state", "placements", ["state"])

    op.create_table(
        "tasks",
        sa.Column("id", _id(), primary_key=True),
        sa.Column(
            "placement_id",
            _id(),
            sa.ForeignKey("placements.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("parent_id", _id(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("deadline", _TS, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("not_before", _TS, nullable=False),
        sa.Column("blocked_by", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("files", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("bytes_moved", sa.BigInteger, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.CheckConstraint(
            "kind IN ('blobs', 'chunks', 'finalize', 'publish')", name="ck_tasks_kind"
        ),
        sa.CheckConstraint(
            "state IN ('queued', 'leased', 'done', 'failed')", name="ck_tasks_state"
        ),
    )
    op.create_index("ix_tasks_placement_state", "tasks", ["placement_id", "state"])
    _partial(
        "ix_tasks_claim_queued",
        "tasks",
        [sa.text("priority DESC"), "deadline", "created_at", "id"],
        "state = 'queued' AND blocked_by = 0",
    )
    _partial("ix_tasks_claim_leased", "tasks", ["lease_expires_at"], "state = 'leased'")
    _partial("ix_tasks_finished", "tasks", ["placement_id", "finished_at"], "state = 'done'")
    op.create_index("ix_entries_version_digest", "entries", ["version_pk", "digest"])

    op.create_table(
        "uploads",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("part_size", sa.BigInteger, nullable=False),
        sa.Column("parts_total", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "upload_parts",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.ForeignKeyConstraint(
            ["site", "digest"], ["uploads.site", "uploads.digest"], ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("upload_parts")
    op.drop_table("uploads")
    op.drop_index("ix_entries_version_digest", table_name="entries")
    for name in (
        "ix_tasks_finished",
        "ix_tasks_claim_leased",
        "ix_tasks_claim_queued",
        "ix_tasks_placement_state",
    ):
        op.drop_index(name, table_name="tasks")
    op.drop_table("tasks")
    op.drop_index("ix_placements_state", table_name="placements")
    op.drop_table("placements")
    op.drop_index("ix_replicas_digest_state", table_name="replicas")
    op.drop_table("replicas")
