"""Worker start: spawned worker processes re-import the console script (``from
datasync.cli import main``) before they run, so that import must stay cheap; they open
the database their parent migrated without loading Alembic; and a running worker opens
its sites (SDK imports, clients) before its first claim."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datasync.backends.retrying import RetryingBackend
from datasync.backends.s3 import S3Backend
from datasync.bootstrap import bootstrap
from datasync.config import Settings, SiteConfig
from datasync.errors import ConfigError
from datasync.transfer.worker import WorkerLoop, WorkerOptions

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


@pytest.fixture
def worker(tmp_path: Path, moto_server: str) -> Iterator[WorkerLoop]:
    """A worker of a fresh database with three sites: POSIX, S3 (a bucket that does not
    exist: opening must not ask), and one that cannot be opened."""
    sites = {
        "lustre": SiteConfig(url=str(tmp_path / "lustre")),
        "aws": SiteConfig(
            url="s3://never-asked/p",
            options={"endpoint_url": moto_server, "region_name": "us-east-1"},
        ),
        "broken": SiteConfig(url="gs:///no-bucket"),
    }
    url = f"sqlite:///{tmp_path / 'ds.db'}"
    app = bootstrap(Settings(home=tmp_path / "home", database_url=url, sites=sites))
    loop = app.worker(WorkerOptions(idle_sleep=0.05))
    yield loop
    loop.close()
    app.close()


def test_a_daemon_worker_opens_its_sites_before_its_first_claim(
    worker: WorkerLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """The first task at a cloud site must not pay for the SDK's import and client: a
    running worker builds them at start, without a request. A site that cannot be opened
    is logged and does not stop the others."""
    backends = worker.executor.ctx.backends
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    with caplog.at_level(logging.WARNING, logger="datasync.transfer.exec.context"):
        runner.start()
        deadline = time.monotonic() + 60
        # Sites are warmed in name order: aws, broken, lustre.
        while "lustre" not in backends.opened and time.monotonic() < deadline:
            time.sleep(0.05)
        opened = backends.opened
        aws = backends["aws"]
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    assert opened == {"aws", "lustre"}
    assert isinstance(aws, RetryingBackend)
    s3 = aws.unwrap()
    assert isinstance(s3, S3Backend)
    assert s3._client is not None, "the S3 client was not built at start"
    assert "site broken not opened at worker start" in caplog.text
    assert "missing bucket name" in caplog.text


def test_a_worker_run_once_opens_no_site_it_has_no_task_for(worker: WorkerLoop) -> None:
    worker.run(threading.Event(), once=True)
    assert worker.executor.ctx.backends.opened == set()
