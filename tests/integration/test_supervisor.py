"""Worker process supervision, with real ``datasync`` processes (Linux ``/proc``).

* The worker children die with their parent: SIGKILL on ``datasync worker --processes 2``
  leaves no child behind (``PR_SET_PDEATHSIG``, plus the parent pipe the child watches).
* SIGTERM on ``datasync up`` stops the whole tree: uvicorn, the scheduler and the
  workers, and the parent exits 0 only after its children are gone.
* ``--processes`` is bounded to 1..4 x CPUs: 0, negative and too many are refused with one
  line and exit 2 before anything starts; ``--force`` lifts the upper bound.
* The parent watch itself (the portable fallback): a child sees its parent's end of the
  pipe close, and a child started after its parent died stops at once.

Every ``datasync`` here runs with its own ``DATASYNC_HOME``, which its children inherit, so
``/proc/*/environ`` finds every process a test started; teardown SIGKILLs any left over.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from datasync.bootstrap import bootstrap
from datasync.config import Settings
from datasync.transfer.supervisor import ParentWatch, WorkerOptions, WorkerPool

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux)")

DATASYNC = Path(sys.executable).with_name("datasync")
STARTUP_SECONDS = 120.0  # two cores shared by the whole suite: imports can be slow
GONE_SECONDS = 10.0


def _ppids() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process, from ``/proc/<pid>/stat``."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (int(fields[1]), fields[0])
    return found


def _alive(pid: int) -> bool:
    state = _ppids().get(pid)
    return state is not None and state[1] not in ("Z", "X")


def _descendants(root: int) -> set[int]:
    table = _ppids()
    found: set[int] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _state) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _threads(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(status.split("Threads:", 1)[1].split()[0])


def _worker_children(root: int) -> set[int]:
    """Spawned worker processes below ``root`` (not multiprocessing's resource tracker)."""
    return {pid for pid in _descendants(root) if "--multiprocessing-fork" in _cmdline(pid)}


def _with_home(home: Path) -> set[int]:
    """Live processes whose environment carries ``DATASYNC_HOME=home``."""
    marker = f"DATASYNC_HOME={home}".encode()
    found = set()
    for pid in _ppids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # exited, or not ours
            continue
        if marker in env and _alive(pid):
            found.add(pid)
    return found


def _until(what: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return what()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A unique DATASYNC_HOME; every process still carrying it afterwards is killed."""
    path = tmp_path / "home"
    yield path
    for pid in _with_home(path):  # only processes this test started (they carry `path`)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASYNC_")}
    env.update(DATASYNC_HOME=str(home), DATASYNC_DATABASE_URL="")
    return env


def _start(home: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(DATASYNC), *args], env=_env(home), stdout=out, stderr=subprocess.STDOUT
        )


def _run(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DATASYNC), *args], env=_env(home), capture_output=True, text=True, timeout=timeout
    )


def _wait_for_workers(proc: subprocess.Popen[bytes], count: int, log: Path) -> set[int]:
    ok = _until(lambda: len(_worker_children(proc.pid)) >= count, STARTUP_SECONDS)
    assert ok, f"{count} worker processes never appeared:\n{log.read_text()[-3000:]}"
    return _worker_children(proc.pid)


def test_sigkill_of_the_parent_takes_its_worker_children_down(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    proc = _start(home, log, "worker", "--processes", "2")
    try:
        children = _wait_for_workers(proc, 2, log)
        time.sleep(1.0)  # past start-up: the children are claiming (an empty queue)
        tree = _descendants(proc.pid)  # the workers and multiprocessing's resource tracker
    finally:
        proc.kill()
        proc.wait(30)
    assert len(children) == 2 and children <= tree
    _until(lambda: not any(_alive(pid) for pid in tree), GONE_SECONDS)
    left = {pid: _cmdline(pid) for pid in tree if _alive(pid)}
    assert not left, f"processes outlived their SIGKILLed parent: {left}"
    assert not _with_home(home)


def test_sigterm_on_up_stops_the_whole_tree(home: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "up.log"
    proc = _start(home, log, "up", "--port", str(port), "--processes", "2")
    try:
        children = _wait_for_workers(proc, 2, log)

        def serving() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        assert _until(serving, STARTUP_SECONDS, 0.2), log.read_text()[-3000:]
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "stopped" in output
    assert children <= tree
    early = {pid: _cmdline(pid) for pid in children if _alive(pid)}
    assert not early, f"`datasync up` exited before its workers: {early}"
    # multiprocessing's resource tracker ends when its last writer, the parent, exits.
    _until(lambda: not any(_alive(pid) for pid in tree), GONE_SECONDS)
    left = {pid: _cmdline(pid) for pid in tree if _alive(pid)}
    assert not left, f"processes outlived `datasync up`: {left}"
    assert not _with_home(home)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_on_worker_stops_its_children_before_it_exits(
    home: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    log = tmp_path / "worker.log"
    proc = _start(home, log, "worker", "--processes", "2")
    try:
        children = _wait_for_workers(proc, 2, log)
        proc.send_signal(sig)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert code == 0, log.read_text()[-3000:]
    early = {pid: _cmdline(pid) for pid in children if _alive(pid)}
    assert not early, f"`datasync worker` exited before its workers: {early}"
    assert _until(lambda: not _with_home(home), GONE_SECONDS)


def test_a_child_that_does_not_stop_is_killed_after_the_timeout(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Escalation: a child that cannot act on SIGTERM (here: SIGSTOPped) is SIGKILLed."""
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url)
    bootstrap(settings).close()  # the pool expects a migrated database
    pool = WorkerPool(settings, 1, options=WorkerOptions(grace=0.5))
    try:
        pool.start()
        (child,) = pool.children
        assert child.pid is not None
        # Running its loop (main, parent watch and heartbeat threads): SIGTERM is handled.
        assert _until(lambda: _threads(child.pid or 0) >= 3, STARTUP_SECONDS)
        os.kill(child.pid, signal.SIGSTOP)
        started = time.monotonic()
        pool.stop(timeout=2.0)
        took = time.monotonic() - started
    finally:
        pool.stop(timeout=0)
    assert child.exitcode == -signal.SIGKILL
    assert 2.0 <= took < 20, took


@pytest.mark.parametrize("processes", ["100000", "-1", "0"])
@pytest.mark.parametrize("command", ["worker", "up"])
def test_processes_out_of_bounds_are_refused_before_anything_starts(
    home: Path, command: str, processes: str
) -> None:
    done = _run(home, command, "--processes", processes)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("datasync: error: --processes ") and done.stderr.count("\n") == 1
    if processes == "100000":
        assert "--force" in done.stderr
    assert not home.exists(), "nothing may start (not even the database) for a refused value"
    assert not _with_home(home)


def test_force_allows_more_processes_than_the_bound(home: Path) -> None:
    over = 4 * (os.cpu_count() or 1) + 1
    refused = _run(home, "worker", "--processes", str(over), "--once")
    assert refused.returncode == 2 and "--force" in refused.stderr
    done = _run(home, "worker", "--processes", str(over), "--once", "--force", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not _with_home(home)


def _parent_gone_child(reader: Connection, parent_pid: int, out: Connection) -> None:
    """A process whose parent watch reports, through ``out``, when it saw the parent go."""
    watch = ParentWatch(reader, parent_pid)
    out.send(watch.wait(30))


def test_parent_watch_sees_the_parent_end_of_the_pipe_close() -> None:
    """The portable fallback alone (no prctl involved): closing the parent's end of the
    pipe, as the kernel does when the parent dies, sets the child's stop signal."""
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_parent_gone_child, args=(reader, os.getpid(), result_w))
    child.start()
    reader.close()
    result_w.close()
    try:
        assert not result_r.poll(3), "the watch fired while the parent was still there"
        writer.close()  # what the parent's death does
        assert result_r.poll(10) and result_r.recv() is True
    finally:
        child.join(10)
    assert child.exitcode == 0


def test_parent_watch_is_set_at_once_when_the_parent_already_changed() -> None:
    """The race where the parent died before the child armed its watch: the parent pid
    the child was given is no longer its parent, so it stops before it claims anything."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        assert ParentWatch(reader, os.getpid() + 1_000_000).is_set()
        alive = ParentWatch(reader, os.getppid())
        assert not alive.wait(0.5)
        writer.close()
        assert alive.wait(10)
    finally:
        writer.close()
        reader.close()
