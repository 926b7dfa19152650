"""Migrations keep data and end exactly at the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

import datasync.db.ops_tables
import datasync.db.transfer_tables  # noqa: F401
from datasync.db.engine import create_engine
from datasync.db.migrate import current_revision, head_revision, run_migrations, upgrade_to_head


@pytest.fixture
def bare_engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def _seed_0002(engine: Engine) -> None:
    now = "CURRENT_TIMESTAMP"
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO datasets (name, created_at) VALUES ('d', {now})"))
        c.execute(
            sa.text(
                "INSERT INTO versions (dataset_pk, version_id, format, chunk_size, files, bytes,"
                f" verified, source, created_at) VALUES (1, 'v', 'f', 1, 0, 0, true, '', {now})"
            )
        )
        c.execute(
            sa.text(
                "INSERT INTO replicas VALUES"
                f" ('s', 'd1', '.datasync/blobs/aa/bb/x', 1, 'ok', NULL, {now}, NULL),"
                f" ('s', 'd1', 'run/a', 1, 'ok', NULL, {now}, NULL)"
            )
        )
        c.execute(
            sa.text(
                "INSERT INTO placements (dataset, version_pk, version_id, site, priority, state,"
                " created_at, updated_at, files_total, bytes_total, files_done, bytes_done)"
                f" VALUES ('d', 1, 'v', 's', 0, 'TRANSFERRING', {now}, {now}, 0, 0, 0, 0)"
            )
        )
        c.execute(
            sa.text(
                "INSERT INTO tasks (placement_id, kind, state, priority, deadline, created_at,"
                " not_before, blocked_by, attempts, max_attempts, payload, errors, files, bytes,"
                f" bytes_moved) VALUES (1, 'publish', 'queued', 0, {now}, {now}, {now}, 0, 0, 8,"
                " '{}', '[]', 0, 0, 0)"
            )
        )


def test_upgrade_from_0002_keeps_every_row_and_classifies_replicas(bare_engine: Engine) -> None:
    run_migrations(bare_engine, lambda cfg: command.upgrade(cfg, "0002"))
    _seed_0002(bare_engine)
    upgrade_to_head(bare_engine)
    assert current_revision(bare_engine) == head_revision()
    with bare_engine.connect() as c:
        kinds = c.execute(sa.text("SELECT key, kind FROM replicas ORDER BY key")).all()
        # Rebuilding a table on SQLite must not cascade into the rows referencing it.
        assert c.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one() == 1
        assert c.execute(sa.text("SELECT count(*) FROM placements")).scalar_one() == 1
    assert [tuple(r) for r in kinds] == [(".datasync/blobs/aa/bb/x", "blob"), ("run/a", "source")]


def test_head_matches_every_model_and_downgrade_round_trips(bare_engine: Engine) -> None:
    upgrade_to_head(bare_engine)
    with bare_engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diffs == []
    run_migrations(bare_engine, lambda cfg: command.downgrade(cfg, "0002"))
    assert current_revision(bare_engine) == "0002"
    upgrade_to_head(bare_engine)
    with bare_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_new_states_are_accepted_and_unknown_ones_refused(bare_engine: Engine) -> None:
    upgrade_to_head(bare_engine)
    _seed_after_head = "UPDATE placements SET state = :s"
    run_migrations(bare_engine, lambda cfg: command.downgrade(cfg, "0002"))
    _seed_0002(bare_engine)
    upgrade_to_head(bare_engine)
    with bare_engine.begin() as c:
        c.execute(sa.text(_seed_after_head), {"s": "DAMAGED"})
    with pytest.raises(sa.exc.IntegrityError), bare_engine.begin() as c:
        c.execute(sa.text(_seed_after_head), {"s": "BOGUS"})
