"""Each verified part of a chunked upload keeps what the store showed for it
(``upload_parts.proof``), so the commit can be proved without re-reading the object.

Mirrors ``datasync/db/transfer_tables.py``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("upload_parts") as batch:
        batch.add_column(sa.Column("proof", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("upload_parts") as batch:
        batch.drop_column("proof")
