"""Worker start: spawned worker processes re-import the console script (``from
datasync.cli import main``) before they run, so that import must stay cheap; and they open
the database their parent migrated without loading Alembic."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasync.bootstrap import bootstrap
from datasync.config import Settings
from datasync.errors import ConfigError

HEAVY = ("typer", "rich", "click", "sqlalchemy", "pydantic", "datasync.cli.commands")


def test_importing_the_cli_package_loads_no_command_machinery() -> None:
    code = f"import sys, datasync.cli\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "", f"`import datasync.cli` pulled in: {out}"


def test_the_app_is_still_reachable_from_the_package() -> None:
    from datasync.cli import app, commands, parse_size

    assert app is commands.app and parse_size("1KiB") == 1024


def test_a_worker_bootstrap_skips_alembic_on_a_migrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ds.db'}"
    bootstrap(Settings(home=tmp_path / "home", database_url=url)).close()  # the parent
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from datasync.bootstrap import bootstrap
        from datasync.config import Settings
        s = Settings(home=Path({str(tmp_path / "home")!r}), database_url={url!r})
        bootstrap(s, migrate=False).close()
        print(" ".join(m for m in ("alembic", "mako") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "", f"a worker's bootstrap loaded {out}"


def test_a_worker_bootstrap_refuses_a_database_without_schema(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigError, match="no datasync schema"):
        bootstrap(settings, migrate=False)
