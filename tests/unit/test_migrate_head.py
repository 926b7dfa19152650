"""The at-head check of ``datasync.db.migrate``: a start on a migrated database reads the
scripts' head as text and never loads Alembic; anything else goes through Alembic."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from datasync.bootstrap import bootstrap
from datasync.config import Settings
from datasync.db import migrate
from datasync.db.engine import create_engine


def test_the_scripts_head_read_as_text_is_alembics_head() -> None:
    assert migrate.script_head() == migrate.head_revision() is not None


def test_a_start_on_a_database_at_head_does_not_load_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ds.db'}"
    bootstrap(Settings(home=tmp_path / "home", database_url=url)).close()  # migrates
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from datasync.bootstrap import bootstrap
        from datasync.config import Settings
        s = Settings(home=Path({str(tmp_path / "home")!r}), database_url={url!r})
        bootstrap(s).close()
        print(" ".join(m for m in ("alembic", "mako", "psycopg") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "", f"a start at head loaded {out}"


@pytest.mark.parametrize("stored", [[], ["0001"], ["0006", "0006x"], ["nope"]])
def test_anything_but_exactly_the_head_is_not_at_head(tmp_path: Path, stored: list[str]) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ds.db'}")
    assert not migrate._at_head(engine)  # no alembic_version table at all
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        for rev in stored:
            conn.execute(sa.text("INSERT INTO alembic_version VALUES (:r)"), {"r": rev})
    assert not migrate._at_head(engine)
    engine.dispose()


def test_a_script_in_another_form_leaves_the_decision_to_alembic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "0001_a.py").write_text('revision = "0001"\ndown_revision = None\n')
    (versions / "0002_b.py").write_text('revision: str = "0002"\ndown_revision = "0001"\n')
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path)
    migrate.script_head.cache_clear()
    try:
        assert migrate.script_head() == "0002"
        migrate.script_head.cache_clear()
        (versions / "0003_merge.py").write_text(
            'revision = "0003"\ndown_revision = ("0001", "0002")\n'
        )
        assert migrate.script_head() is None
        migrate.script_head.cache_clear()
        (versions / "0003_merge.py").write_text('revision = "0003"\ndown_revision = "0001"\n')
        assert migrate.script_head() is None  # two heads
    finally:
        migrate.script_head.cache_clear()
