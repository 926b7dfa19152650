"""A full file system is a pause, not a failure (issue 13, item 9).

The destination site is a real 1 MiB tmpfs, filled to the last byte by a ballast file. A
replication into it meets ENOSPC: the task is retried after the retry policy's space
backoff (not failed), with ``NoSpace`` as its visible reason in ``status``. Freeing the
space lets the same placement finish with no one running ``replicate`` again, and the
view is checked with an independent hash.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datasync.bootstrap import bootstrap
from datasync.transfer.status import PlacementStatus
from datasync.transfer.worker import WorkerOptions
from tests.fixtures.replication import assert_view_matches, make_tree, posix_site, settings_for
from tests.unit.test_posix import mounted_tmpfs

# Space backoff of 0.5 s (the default is 30 s): attempts come 0.25-0.5 s, 0.5-1 s, ... apart.
OPTIONS = WorkerOptions(
    queue_backoff_base=0.0, space_backoff_base=0.5, idle_sleep=0.05, lease_seconds=30
)


def _fill(directory: Path) -> Path:
    """Write a ballast file until the file system says it is full."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return ballast


def _until(
    read: Callable[[], PlacementStatus], done: Callable[[PlacementStatus], bool], timeout: float
) -> PlacementStatus:
    end = time.monotonic() + timeout
    while True:
        st = read()
        if done(st) or time.monotonic() > end:
            return st
        time.sleep(0.1)


@pytest.fixture
def full_site(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "lustre", "size=1m") as mnt:
        yield mnt


def test_a_full_destination_waits_and_finishes_once_space_is_freed(
    tmp_path: Path, sqlite_url: str, full_site: Path
) -> None:
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", full_site)
    run = tmp_path / "pipeline" / "run"
    files = make_tree(run, seed=9)  # about 150 KiB
    ballast = _fill(full_site)
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst])
    with bootstrap(settings) as app:
        version = app.service.register_directory("drive/full", run)
        placement = app.replication.replicate(f"drive/full@{version.version_id}", "lustre")
        loop = app.worker(OPTIONS)
        stop = threading.Event()
        worker = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        worker.start()
        try:

            def read() -> PlacementStatus:
                return app.replication.status(placement_id=placement.id)[0]

            blocked = _until(
                read, lambda st: any(e["class"] == "NoSpace" for e in st.last_errors), 60
            )
            errors = [e for e in blocked.last_errors if e["class"] == "NoSpace"]
            assert errors, (blocked.state, blocked.error, blocked.last_errors)
            assert "No space left on device" in errors[0]["message"]
            assert str(full_site) in errors[0]["message"]
            assert blocked.state == "TRANSFERRING" and blocked.error is None
            assert blocked.tasks.get("failed", 0) == 0

            ballast.unlink()  # someone frees space; nobody runs replicate again
            final = _until(read, lambda st: st.state in ("READY", "FAILED"), 120)
            assert final.state == "READY", (final.error, final.last_errors)
            assert final.files_done == final.files_total == len(files)
        finally:
            stop.set()
            worker.join(60)
            loop.close()
    assert_view_matches(dst, "drive/full", version.version_id, files)
