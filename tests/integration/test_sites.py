"""``insert_source_rows`` reports the rows it inserted on SQLite and PostgreSQL alike.

PostgreSQL once read 0 here while inserting every row: SQLAlchemy drops the cursor's
rowcount of an ``INSERT ... SELECT ... ON CONFLICT`` unless ``preserve_rowcount`` is set.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from datasync.db.engine import write_transaction
from datasync.db.transfer_tables import Replica
from datasync.transfer.sites import insert_source_rows
from tests.fixtures.transfer import fake_entry, register, version_pk

_R: sa.Table = Replica.__table__  # type: ignore[attr-defined]


def _rows(engine: Engine, site: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(_R.c.key, _R.c.state).where(_R.c.site == site))
        return sorted((str(k), str(s)) for k, s in rows)


def test_insert_source_rows_returns_the_inserted_count(engine: Engine) -> None:
    entries = [fake_entry(f"cam/{i:03d}.jpg", str(i), 100 + i) for i in range(37)]
    vpk = version_pk(engine, register(engine, "drive/rows", entries))
    with write_transaction(engine) as conn:  # inside a caller's transaction, as replicate does
        assert insert_source_rows(conn, "pipeline", "", vpk) == 37
        assert insert_source_rows(conn, "nas", "runs/7/", vpk) == 37
    assert len(_rows(engine, "pipeline")) == 37
    assert _rows(engine, "nas")[0] == ("runs/7/cam/000.jpg", "ok")
    # Existing rows are left alone and not counted.
    with write_transaction(engine) as conn:
        assert insert_source_rows(conn, "pipeline", "", vpk) == 0
    more = [*entries, fake_entry("cam/new.jpg", "new", 5)]
    vpk2 = version_pk(engine, register(engine, "drive/rows", more))
    with write_transaction(engine) as conn:
        assert insert_source_rows(conn, "pipeline", "", vpk2) == 1
    assert len(_rows(engine, "pipeline")) == 38
