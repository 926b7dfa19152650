"""Multiprocess metrics in a host directory: processes that are gone keep counting.

Real processes write counters and histograms into one directory through the same code
``datasync`` runs (``enable_multiprocess`` + ``Metrics``) and exit; the collector must then
report exactly the sums, fold the dead files into the archives, never count a file twice
(also when a fold was interrupted at any step), and leave live processes' files alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from datasync.observe.exposition import HostMetricsCollector, compact

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from datasync.observe.exposition import enable_multiprocess, process_metrics
    enable_multiprocess(Path(sys.argv[1]))
    m = process_metrics()
    m.transfer_bytes.labels("pipeline", "lustre").inc(int(sys.argv[2]))
    m.task_duration.labels("blobs", "done").observe(float(sys.argv[3]))
    if len(sys.argv) > 4:  # stay alive until told
        print("ready", flush=True)
        sys.stdin.readline()
    """
)


def _write(directory: Path, nbytes: int, seconds: float) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(directory), str(nbytes), str(seconds)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )
    assert done.returncode == 0, done.stderr


def _sample(directory: Path, name: str, **labels: str) -> float:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostMetricsCollector(directory))
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}: {generate_latest(registry).decode()}")


def _pid_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.db") if "archive" not in p.name)


def test_dead_processes_are_folded_once_and_keep_counting(tmp_path: Path) -> None:
    for nbytes, seconds in ((100, 0.2), (250, 3.0), (7, 0.07)):
        _write(tmp_path, nbytes, seconds)
    # Each process folded the ones before it when it started; the last one's files remain.
    assert len(_pid_files(tmp_path)) == 2
    bytes_sample = "datasync_transfer_bytes_total"
    assert _sample(tmp_path, bytes_sample, src="pipeline", dst="lustre") == 357
    assert _pid_files(tmp_path) == []  # folded by the scrape
    assert (tmp_path / "counter_archive.db").exists()
    # Scraping again, and folding again, changes nothing.
    compact(tmp_path)
    assert _sample(tmp_path, bytes_sample, src="pipeline", dst="lustre") == 357
    count = "datasync_task_duration_seconds_count"
    assert _sample(tmp_path, count, kind="blobs", outcome="done") == 3
    bucket = "datasync_task_duration_seconds_bucket"
    assert _sample(tmp_path, bucket, kind="blobs", outcome="done", le="0.1") == 1
    assert _sample(tmp_path, bucket, kind="blobs", outcome="done", le="0.25") == 2
    assert _sample(tmp_path, bucket, kind="blobs", outcome="done", le="+Inf") == 3
    # A later process adds to the archive's totals.
    _write(tmp_path, 43, 0.2)
    assert _sample(tmp_path, bytes_sample, src="pipeline", dst="lustre") == 400


def test_live_processes_are_read_in_place(tmp_path: Path) -> None:
    _write(tmp_path, 5, 0.1)
    live = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "11", "0.1", "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        assert _sample(tmp_path, "datasync_transfer_bytes_total") == 16
        assert f"counter_{live.pid}.db" in _pid_files(tmp_path)
    finally:
        assert live.stdin is not None
        live.stdin.write("\n")
        live.stdin.close()
        live.wait(timeout=30)
    assert _sample(tmp_path, "datasync_transfer_bytes_total") == 16
    assert _pid_files(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _clone_dead(directory: Path, template: dict[str, bytes]) -> None:
    """Files of one more dead process, with the template's values."""
    pid = _dead_pid()
    for typ, data in template.items():
        (directory / f"{typ}_{pid}.db").write_bytes(data)


@pytest.mark.parametrize("crash_after", ["tmp_written", "journaled", "renamed", "one_deleted"])
def test_an_interrupted_fold_is_finished_or_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after: str
) -> None:
    """Crash the fold after each of its steps; the next scrape must count every byte once."""
    _write(tmp_path, 1000, 0.1)
    template = {
        typ: next(tmp_path.glob(f"{typ}_[0-9]*.db")).read_bytes()
        for typ in ("counter", "histogram")
    }
    _clone_dead(tmp_path, template)
    assert _sample(tmp_path, "datasync_transfer_bytes_total") == 2000  # the archive exists
    for _ in range(3):
        _clone_dead(tmp_path, template)

    class Crash(Exception):
        pass

    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src: str | Path, dst: str | Path) -> None:
        if crash_after == "tmp_written" and str(dst).endswith("_journal"):
            raise Crash
        real_replace(src, dst)
        if crash_after == "journaled" and str(dst).endswith("_journal"):
            raise Crash
        if crash_after == "renamed" and str(dst).endswith("_archive.db"):
            raise Crash

    def unlink(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        if crash_after == "one_deleted" and self.name[len("counter_") :].split(".")[0].isdigit():
            raise Crash

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Crash):
        compact(tmp_path)
    monkeypatch.undo()
    assert _sample(tmp_path, "datasync_transfer_bytes_total") == 5000
    assert _sample(tmp_path, "datasync_task_duration_seconds_count") == 5
    assert _pid_files(tmp_path) == []
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []
