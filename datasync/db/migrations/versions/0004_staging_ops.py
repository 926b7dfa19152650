"""Staging, scheduling and operations: stage requests, pins, link statistics, policies,
workers, API tokens; placement origin, last use and risk; EVICTED placements; tasks know
their link and start time, and are claimed by deadline slack (``latest_start``).

Mirrors ``datasync/db/ops_tables.py`` and ``datasync/db/transfer_tables.py``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)
_STATES = ("PLANNING", "TRANSFERRING", "PUBLISHING", "READY", "FAILED", "DAMAGED", "EVICTED")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _placement_fk() -> sa.ForeignKey:
    return sa.ForeignKey("placements.id", ondelete="CASCADE")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _claim_index(columns: list[sa.TextClause | str]) -> None:
    where = "state = 'queued' AND blocked_by = 0"
    op.create_index(
        "ix_tasks_claim_queued",
        "tasks",
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    op.create_table(
        "stage_requests",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column(
            "placement_id",
            _id(),
            sa.ForeignKey("placements.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("deadline", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("released_at", _TS, nullable=True),
        sa.UniqueConstraint("job_id", "placement_id", name="uq_stage_job_placement"),
    )
    op.create_index("ix_stage_requests_job_id", "stage_requests", ["job_id"])
    op.create_table(
        "pins",
        sa.Column(
            "placement_id",
            _id(),
            sa.ForeignKey("placements.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("holder", sa.String(255), primary_key=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=True),
    )
    op.create_table(
        "placement_history",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("placement_id", _id(), _placement_fk(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_placement_history_placement_id", "placement_history", ["placement_id"])
    op.create_table(
        "link_stats",
        sa.Column("src_site", sa.String(64), primary_key=True),
        sa.Column("dst_site", sa.String(64), primary_key=True),
        sa.Column("bytes_per_second", sa.Float, nullable=False),
        sa.Column("samples", sa.BigInteger, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("penalty_until", _TS, nullable=True),
    )
    op.create_table(
        "policies",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("applied_at", _TS, nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(255), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("last_seen", _TS, nullable=False),
        sa.Column("tasks_running", sa.Integer, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("namespaces", sa.JSON, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("last_used_at", _TS, nullable=True),
    )
    op.drop_index("ix_tasks_claim_queued", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:  # adding columns needs no rebuild
        batch.add_column(sa.Column("src_site", sa.String(64), nullable=True))
        batch.add_column(sa.Column("dst_site", sa.String(64), nullable=True))
        batch.add_column(sa.Column("started_at", _TS, nullable=True))
        batch.add_column(sa.Column("move_bytes", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(
            sa.Column(
                "latest_start",
                _TS,
                nullable=False,
                server_default=sa.text("'9999-12-31 00:00:00+00:00'"),
            )
        )
    op.execute("UPDATE tasks SET latest_start = deadline")
    _claim_index(["latest_start", sa.text("priority DESC"), "created_at", "id"])
    op.create_index(
        "ix_tasks_link_finished",
        "tasks",
        ["dst_site", "finished_at"],
        postgresql_where=sa.text("state = 'done'"),
        sqlite_where=sa.text("state = 'done'"),
    )
    with op.batch_alter_table("placements", recreate="auto") as batch:
        batch.add_column(
            sa.Column("origin", sa.String(160), nullable=False, server_default="operator")
        )
        batch.add_column(sa.Column("last_used_at", _TS, nullable=True))
        batch.add_column(
            sa.Column("at_risk", sa.Boolean, nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("placements", recreate="auto") as batch:
        batch.alter_column("origin", server_default=None, existing_type=sa.String(160))
        batch.alter_column("at_risk", server_default=None, existing_type=sa.Boolean)
        batch.drop_constraint("ck_placements_state", type_="check")
        batch.create_check_constraint("ck_placements_state", _in("state", _STATES))


def downgrade() -> None:
    op.execute("UPDATE placements SET state = 'FAILED' WHERE state = 'EVICTED'")
    with op.batch_alter_table("placements", recreate="auto") as batch:
        batch.drop_constraint("ck_placements_state", type_="check")
        batch.create_check_constraint("ck_placements_state", _in("state", _STATES[:-1]))
        batch.drop_column("at_risk")
        batch.drop_column("last_used_at")
        batch.drop_column("origin")
    op.drop_index("ix_tasks_link_finished", table_name="tasks")
    op.drop_index("ix_tasks_claim_queued", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        for column in ("latest_start", "move_bytes", "started_at", "dst_site", "src_site"):
            batch.drop_column(column)
    _claim_index([sa.text("priority DESC"), "deadline", "created_at", "id"])
    op.drop_index("ix_placement_history_placement_id", table_name="placement_history")
    for table in ("api_tokens", "workers", "policies", "link_stats", "placement_history", "pins"):
        op.drop_table(table)
    op.drop_index("ix_stage_requests_job_id", table_name="stage_requests")
    op.drop_table("stage_requests")
