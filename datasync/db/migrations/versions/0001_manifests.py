"""Manifest store: datasets, versions, entries, labels.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _path() -> sa.types.TypeEngine[str]:
    # Bytewise comparison: SQLite's BINARY default, COLLATE "C" on PostgreSQL.
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("name", _path(), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column(
            "dataset_pk",
            sa.Integer,
            sa.ForeignKey("datasets.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version_id", sa.String(64), nullable=True),
        sa.Column("format", sa.String(64), nullable=False),
        sa.Column("chunk_size", sa.BigInteger, nullable=False),
        sa.Column("files", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("dataset_pk", "version_id", name="uq_versions_dataset_version_id"),
    )
    op.create_index("ix_versions_version_id", "versions", ["version_id"])
    op.create_table(
        "entries",
        sa.Column(
            "version_pk",
            sa.Integer,
            sa.ForeignKey("versions.pk", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("path", _path(), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("chunks", sa.Text, nullable=True),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "labels",
        sa.Column(
            "dataset_pk",
            sa.Integer,
            sa.ForeignKey("datasets.pk", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column(
            "version_pk",
            sa.Integer,
            sa.ForeignKey("versions.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_labels_version_pk", "labels", ["version_pk"])


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("entries")
    op.drop_index("ix_versions_version_id", table_name="versions")
    op.drop_table("versions")
    op.drop_table("datasets")
