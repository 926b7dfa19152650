"""Integrity: replica kinds, re-checks of bad sources, DAMAGED placements, labels tasks.

* ``replicas.kind``: ``blob`` for the site's blob store, ``source`` for a registration
  source's files (existing rows are classified by their key), and ``recheck_after``.
* ``placements.state`` may be ``DAMAGED``; ``tasks.kind`` may be ``labels``.

Mirrors ``datasync/db/transfer_tables.py``. SQLite cannot alter a CHECK constraint, so
the two tables are rebuilt in batch mode there (their indexes are re-created below).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)

_PLACEMENT_STATES = ("PLANNING", "TRANSFERRING", "PUBLISHING", "READY", "FAILED", "DAMAGED")
_TASK_KINDS = ("blobs", "chunks", "finalize", "publish", "labels")
_OLD_PLACEMENT_STATES = _PLACEMENT_STATES[:-1]
_OLD_TASK_KINDS = _TASK_KINDS[:-1]


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _claim_indexes() -> None:
    def partial(name: str, columns: list[sa.TextClause | str], where: str) -> None:
        op.create_index(
            name, "tasks", columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where)
        )

    op.create_index("ix_tasks_placement_state", "tasks", ["placement_id", "state"])
    partial(
        "ix_tasks_claim_queued",
        [sa.text("priority DESC"), "deadline", "created_at", "id"],
        "state = 'queued' AND blocked_by = 0",
    )
    partial("ix_tasks_claim_leased", ["lease_expires_at"], "state = 'leased'")
    partial("ix_tasks_finished", ["placement_id", "finished_at"], "state = 'done'")


_TASK_INDEXES = (
    "ix_tasks_placement_state",
    "ix_tasks_claim_queued",
    "ix_tasks_claim_leased",
    "ix_tasks_finished",
)


def _set_checks(placement_states: tuple[str, ...], task_kinds: tuple[str, ...]) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:  # the rebuild drops them; re-created after
        for name in _TASK_INDEXES:
            op.drop_index(name, table_name="tasks")
    with op.batch_alter_table("placements", recreate="auto") as batch:
        batch.drop_constraint("ck_placements_state", type_="check")
        batch.create_check_constraint("ck_placements_state", _in("state", placement_states))
    with op.batch_alter_table("tasks", recreate="auto") as batch:
        batch.drop_constraint("ck_tasks_kind", type_="check")
        batch.create_check_constraint("ck_tasks_kind", _in("kind", task_kinds))
    if sqlite:
        _claim_indexes()


def upgrade() -> None:
    with op.batch_alter_table("replicas", recreate="auto") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="blob"))
        batch.add_column(sa.Column("recheck_after", _TS, nullable=True))
    op.execute("UPDATE replicas SET kind = 'source' WHERE key NOT LIKE '.datasync/blobs/%'")
    with op.batch_alter_table("replicas", recreate="auto") as batch:
        batch.alter_column("kind", server_default=None, existing_type=sa.String(8))
        batch.create_check_constraint("ck_replicas_kind", "kind IN ('blob', 'source')")
    _set_checks(_PLACEMENT_STATES, _TASK_KINDS)


def downgrade() -> None:
    op.execute("DELETE FROM tasks WHERE kind = 'labels'")
    op.execute("UPDATE placements SET state = 'FAILED' WHERE state = 'DAMAGED'")
    _set_checks(_OLD_PLACEMENT_STATES, _OLD_TASK_KINDS)
    with op.batch_alter_table("replicas", recreate="auto") as batch:
        batch.drop_constraint("ck_replicas_kind", type_="check")
        batch.drop_column("recheck_after")
        batch.drop_column("kind")
