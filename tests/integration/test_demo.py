"""``make demo`` end to end: ``scripts/demo.sh`` with ``DEMO_DIR`` in a temp directory.

Runs the real script (real CLI processes, a real worker, SQLite, moto's S3 server) once
per module and checks what it prints against what it must show: the same version id on
re-registration, a diff, READY placements at ``lustre`` and ``s3``, and an incremental
second version that moved exactly the bytes of its new blobs. The published views are
then re-read from disk and hashed here, independently of the engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo.sh"
DATASET = "drive/tokyo-urban"
TIMEOUT = 300  # the demo takes ~50 s here; a hung worker must not hang the suite


@dataclass(frozen=True)
class DemoRun:
    returncode: int
    output: str  # stdout and stderr, interleaved
    demo_dir: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    demo_dir = tmp_path_factory.mktemp("demo")
    if not (Path(sys.prefix) / "bin" / "moto_server").exists():
        pytest.skip("moto_server not in this environment: pip install 'moto[server]'")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATASYNC_HOME", "DATASYNC_DATABASE_URL", "DATASYNC_CONFIG", "DEMO_S3")
    }
    env.update(DEMO_DIR=str(demo_dir), VENV=sys.prefix, COLUMNS="200")
    # Own session: on a timeout the whole group (worker, moto_server) is stopped.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"demo did not finish in {TIMEOUT}s:\n{out.decode(errors='replace')[-4000:]}")
    return DemoRun(proc.returncode, out.decode(errors="replace"), demo_dir)


def _tail(run: DemoRun) -> str:
    return run.output[-4000:]


def test_demo_exits_zero(demo: DemoRun) -> None:
    assert demo.returncode == 0, _tail(demo)
    assert "==> " in demo.output and "done in" in demo.output


def test_reregistration_gives_the_same_version_id(demo: DemoRun) -> None:
    first = re.search(rf"^registered {DATASET}@([0-9a-f]{{64}})$", demo.output, re.M)
    assert first, _tail(demo)
    again = [
        json.loads(line)
        for line in demo.output.splitlines()
        if line.startswith("{") and '"created"' in line
    ]
    assert len(again) == 1, again
    assert again[0]["version_id"] == first.group(1)
    assert again[0]["created"] is False
    assert again[0]["files"] == 50


def test_diff_is_shown(demo: DemoRun) -> None:
    assert "1 added, 1 removed, 2 changed" in demo.output, _tail(demo)
    assert "M lidar/top/000005.bin" in demo.output
    diff_json = next(
        json.loads(line)
        for line in demo.output.splitlines()
        if line.startswith("{") and '"added"' in line
    )
    assert [c["path"] for c in diff_json["changed"]] == [
        "camera/front/000003.jpg",
        "lidar/top/000005.bin",
    ]


def test_placements_become_ready(demo: DemoRun) -> None:
    ready = set(re.findall(r"^#(\d+) \S+ -> (\w+): READY ", demo.output, re.M))
    assert {("1", "lustre"), ("2", "lustre"), ("3", "s3")} <= ready, _tail(demo)
    assert "stopped datasync worker" in demo.output and "stopped moto_server" in demo.output
    assert "FAILED" not in demo.output


def test_incremental_version_moves_only_the_changed_bytes(demo: DemoRun) -> None:
    moved = re.search(r"bytes moved by its \d+ tasks: ([\d,]+)", demo.output)
    fresh = re.search(r"new bytes in \S+ vs \S+: ([\d,]+) \((\d+) new blobs\)", demo.output)
    assert moved and fresh, _tail(demo)
    n_moved, n_new = (int(m.group(1).replace(",", "")) for m in (moved, fresh))
    assert fresh.group(2) == "3"  # one frame rewritten, one sweep grown, one frame added
    assert 0 < n_moved == n_new < 1_000_000, (n_moved, n_new)
    assert "only the changed bytes moved" in demo.output


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): xxhash.xxh3_128_hexdigest(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_published_views_match_the_pipeline_runs(demo: DemoRun) -> None:
    assert demo.returncode == 0, _tail(demo)
    views = demo.demo_dir / "lustre" / DATASET
    runs = demo.demo_dir / "pipeline" / "tokyo-urban"
    for label, run in (("v1", "run-1"), ("v2", "run-2")):
        view = views.with_name(f"{views.name}@{label}")
        assert view.is_symlink() and (views.parent / os.readlink(view)).is_dir()
        assert _hashes(view) == _hashes(runs / run), label
    latest, v2 = (views.with_name(f"{views.name}@{label}") for label in ("latest", "v2"))
    assert os.readlink(latest) == os.readlink(v2)
    # A view is read-only hard links into the site's blob store, not copies.
    shard = views.with_name(f"{views.name}@v1") / "shards" / "train-00000.tar"
    assert shard.stat().st_nlink >= 2 and shard.stat().st_mode & 0o777 == 0o444
    leftovers = [p.name for p in views.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_a_stage_request_with_a_deadline_prints_the_verified_view(demo: DemoRun) -> None:
    """Part 4: v2 staged at s3 with a deadline: READY, its view's path printed, explained
    (created by the stage request, pinned by the job), then released."""
    staged = re.search(r"^drive/tokyo-urban@([0-9a-f]{64}) at s3: ", demo.output, re.M)
    ready = re.search(r"^READY at s3: (\S+)$", demo.output, re.M)
    assert staged and ready, _tail(demo)
    assert ready.group(1) == f"s3://demo-bucket/drive/tokyo-urban/{staged.group(1)}"
    explained = demo.output.split("datasync explain drive/tokyo-urban@v2", 1)[1]
    assert "(created by stage)" in explained and "pinned by job:demo-train-1" in explained
    assert "released 1 placement(s) of job demo-train-1" in demo.output
