"""``record_sources`` reports the rows it inserted on SQLite and PostgreSQL alike.

PostgreSQL once read 0 here while inserting every row: SQLAlchemy drops the cursor's
rowcount of an ``INSERT ... SELECT ... ON CONFLICT`` unless ``preserve_rowcount`` is set.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.transfer_tables import Replica
from tests.fixtures.transfer import fake_entry, make_state, register, version_pk


def _rows(engine: Engine, site: str) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(col(Replica.key), col(Replica.state), col(Replica.kind)).where(
                col(Replica.site) == site
            )
        )
        return sorted((str(k), str(s), str(kind)) for k, s, kind in rows)


def test_record_sources_returns_the_inserted_count(engine: Engine) -> None:
    entries = [fake_entry(f"cam/{i:03d}.jpg", str(i), 100 + i) for i in range(37)]
    vpk = version_pk(engine, register(engine, "drive/rows", entries))
    replicas = make_state(engine).replicas
    assert replicas.record_sources("pipeline", "", vpk, refresh=False) == 37
    assert replicas.record_sources("nas", "runs/7/", vpk, refresh=False) == 37
    assert len(_rows(engine, "pipeline")) == 37
    assert _rows(engine, "nas")[0] == ("runs/7/cam/000.jpg", "ok", "source")
    # Existing rows are left alone and not counted; a refresh counts them again.
    assert replicas.record_sources("pipeline", "", vpk, refresh=False) == 0
    assert replicas.record_sources("pipeline", "", vpk, refresh=True) == 37
    more = [*entries, fake_entry("cam/new.jpg", "new", 5)]
    vpk2 = version_pk(engine, register(engine, "drive/rows", more))
    assert replicas.record_sources("pipeline", "", vpk2, refresh=False) == 1
    assert len(_rows(engine, "pipeline")) == 38
