"""Blobs in flight are shared: ``blob_moves`` (which task moves a blob to a site),
``blob_waits`` (placements waiting for it) and ``tasks.waiters``.

Mirrors ``datasync/db/transfer_tables.py``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:  # adding a column needs no rebuild
        batch.add_column(sa.Column("waiters", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "blob_moves",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("task_id", _id(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    )
    op.create_index("ix_blob_moves_task_id", "blob_moves", ["task_id"])
    op.create_table(
        "blob_waits",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("mover_id", _id(), sa.ForeignKey("tasks.id", ondelete="SET NULL")),
        sa.Column(
            "publish_id", _id(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "placement_id",
            _id(),
            sa.ForeignKey("placements.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("files", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_blob_waits_mover_id", "blob_waits", ["mover_id"])
    op.create_index("ix_blob_waits_publish_id", "blob_waits", ["publish_id"])


def downgrade() -> None:
    op.drop_table("blob_waits")
    op.drop_table("blob_moves")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("waiters")
