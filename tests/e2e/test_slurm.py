"""deploy/slurm/burst_buffer.lua against a real Slurm (Debian's 22.05) and a real datasync.

The cluster comes from ``tests/fixtures/slurm.py``. The datasync side (``world``): a
temp ``DATASYNC_HOME`` with SQLite, two POSIX sites under the cluster's directory (the
job user can read them), ``pipeline`` (where versions are registered) and ``lustre`` (the
staging target, slowed to 16 Mbit/s so stage-in lasts a few seconds), and a
``datasync worker`` running in the background. ``datasync-bb.conf`` points the lua at
this venv's CLI.

What is proven:
* a job stays PENDING with Reason=BurstBufferStageIn while its version is not READY, and
  never runs before (sampled together with the placement's state); then it runs, finds
  the view at ``$DATASYNC_CAM_PATH`` and hashes it with ``xxh128sum`` to the manifest's
  digests; teardown releases the job's pins;
* malformed directives, unknown refs and unknown sites make ``sbatch`` fail, with the
  lua's message;
* a version whose source is gone holds the job (priority 0) with datasync's reason;
* Slurm >= 24.05's polling path (``slurm_bb_test_data_in``) cannot run on 22.05, so a Lua
  5.1 harness calls the hooks the way that Slurm does (``slurm.SLURM_BB_BUSY`` set):
  data_in returns at once, test_data_in answers BUSY until READY, paths exports the view.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.config import load_settings
from datasync.db.engine import create_engine
from datasync.db.ops_tables import Pin, StageRequest
from datasync.transfer.status import status
from tests.fixtures.emulators import _free_port
from tests.fixtures.slurm import SlurmCluster

pytestmark = pytest.mark.slurm

DATASYNC = str(Path(sys.executable).parent / "datasync")
MIB = 1024 * 1024


@dataclass
class World:
    cluster: SlurmCluster
    root: Path
    env: dict[str, str]

    def datasync(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [DATASYNC, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def register(self, dataset: str, files: dict[str, int], run: str) -> str:
        """Write ``files`` (name -> size, random bytes) under pipeline/runs/RUN and register
        them as DATASET@v1; returns the version id."""
        folder = self.root / "pipeline" / "runs" / run
        folder.mkdir(parents=True)
        for name, size in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(os.urandom(size))
        out = self.datasync("register", dataset, f"pipeline:runs/{run}", "--label", "v1", "--json")
        return str(json.loads(out.stdout)["version_id"])

    def placement_state(self, dataset: str) -> str | None:
        engine = create_engine(load_settings(self.env).database_url)
        try:
            rows = status(engine, dataset=dataset, site="lustre")
        finally:
            engine.dispose()
        return str(rows[0].state) if rows else None

    def pins_of(self, job_key: str) -> tuple[int, int]:
        """(live pins, unreleased stage requests) held by one job."""
        engine = create_engine(load_settings(self.env).database_url)
        try:
            with engine.connect() as conn:
                pins = conn.execute(
                    sa.select(sa.func.count()).where(col(Pin.holder) == f"job:{job_key}")
                ).scalar_one()
                open_requests = conn.execute(
                    sa.select(sa.func.count()).where(
                        col(StageRequest.job_id) == job_key, col(StageRequest.released_at).is_(None)
                    )
                ).scalar_one()
        finally:
            engine.dispose()
        return int(pins), int(open_requests)


@pytest.fixture(scope="module")
def world(slurm_cluster: SlurmCluster) -> Iterator[World]:
    root = slurm_cluster.dir / "datasync"
    for sub in ("pipeline", "lustre", "home"):
        (root / sub).mkdir(parents=True)
    for path in (root, root / "pipeline", root / "lustre"):
        path.chmod(0o755)
    config = root / "datasync.toml"
    config.write_text(
        f'[sites.pipeline]\nurl = "{root / "pipeline"}"\n\n'
        f'[sites.lustre]\nurl = "{root / "lustre"}"\nbandwidth_mbps = 16\n'
    )
    env = {**os.environ, "DATASYNC_CONFIG": str(config), "DATASYNC_HOME": str(root / "home")}
    (slurm_cluster.dir / "datasync-bb.conf").write_text(
        f"# written by tests/e2e/test_slurm.py\ndatasync={DATASYNC}\n"
        f"config={config}\nhome={root / 'home'}\n"
    )
    world = World(slurm_cluster, root, env)
    world.datasync("sites", "--no-probe")  # creates and migrates the database first
    world.register("drive/known", {"x.bin": 10}, "known")  # for the refused directives
    with (root / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [DATASYNC, "worker", "--processes", "1"], env=env, stdout=log, stderr=log
        )
    try:
        yield world
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


def _wait_for(job_id: int, cluster: SlurmCluster, done: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["state"] in done:
            return job
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} not in {done} after {timeout} s: {job}\n{cluster.log()[-4000:]}"
    )


def _manifest_digests(world: World, ref: str) -> dict[str, str]:
    lines = world.datasync("export", ref).stdout.splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return {e["path"]: e["digest"].removeprefix("xxh3-128:") for e in entries if "digest" in e}


def test_job_pends_in_stage_in_then_reads_its_view(world: World) -> None:
    cluster = world.cluster
    files = {f"cam0/{i:03d}.bin": 2 * MIB for i in range(5)} | {"meta/index.json": 300}
    version_id = world.register("drive/cam", files, "r1")
    out, err = cluster.jobs / "stagein.out", cluster.jobs / "stagein.xxh.err"
    job_id, submitted = cluster.sbatch(
        "stagein",
        f"#!/bin/bash\n#SBATCH -o {out}\n"
        "#BB_LUA datasync dataset=drive/cam@v1 site=lustre name=CAM\n"
        'echo "path=$DATASYNC_CAM_PATH"\n'
        # xxh128sum draws progress on stderr: keep it out of the digests.
        f'cd "$DATASYNC_CAM_PATH" && find . -type f -printf "%P\\0" | sort -z'
        f" | xargs -0 xxh128sum 2>{err}\n",
    )
    assert job_id is not None, submitted.stderr
    samples: list[tuple[str, str, str | None]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        samples.append((job["state"], job["reason"], world.placement_state("drive/cam")))
        if job["state"] in {"COMPLETED", "FAILED", "CANCELLED"}:
            break
        time.sleep(0.3)
    assert samples[-1][0] == "COMPLETED", (samples[-8:], cluster.log()[-4000:])
    # Held in stage-in while datasync was still moving the bytes ...
    assert any(
        state == "PENDING" and reason == "BurstBufferStageIn" and placement != "READY"
        for state, reason, placement in samples
    ), samples
    # ... and never running before the view was READY.
    assert all(placement == "READY" for state, _, placement in samples if state == "RUNNING")
    # On 22.05 stage-in completes inside slurm_bb_data_in (run by slurmscriptd), not through
    # slurm_bb_paths' fallback inside slurmctld, which is only the safety net.
    log = cluster.log()
    assert f"slurmscriptd: lua: datasync burst_buffer.lua: job {job_id}: 1 version(s) ready" in log
    assert f"paths for JobId={job_id} failed" not in log
    lines = out.read_text().splitlines()
    view = world.root / "lustre" / "drive" / "cam" / version_id
    assert lines[0] == f"path={view}"
    hashed = {path: digest for digest, path in (line.split("  ", 1) for line in lines[1:])}
    assert hashed == _manifest_digests(world, f"drive/cam@{version_id}")
    assert len(hashed) == len(files)
    # Teardown (asynchronous, after the job ends) releases the job's pins.
    key = f"slurm:dstest:{job_id}"
    deadline = time.monotonic() + 30
    while world.pins_of(key) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert world.pins_of(key) == (0, 0)


@pytest.mark.parametrize(
    ("directive", "message"),
    [
        ("dataset=drive/known@v1 site=lustre name=cam", "name=cam: use an upper-case identifier"),
        ("dataset=drive/known site=lustre name=K", "dataset=drive/known: use DATASET@REF"),
        ("dataset=drive/known@v1 site=lustre", "name= missing"),
        ("dataset=drive/known@v1 site=lustre name=K size=3", 'unknown key "size"'),
        ("dataset=drive/known@nope site=lustre name=K", "no label or version id 'nope'"),
        ("dataset=drive/nothing@v1 site=lustre name=K", "unknown dataset"),
        ("dataset=drive/known@v1 site=mars name=K", "unknown site 'mars'"),
    ],
)
def test_bad_directive_is_refused_at_submit(world: World, directive: str, message: str) -> None:
    job_id, result = world.cluster.sbatch(
        "refused", f"#!/bin/bash\n#BB_LUA datasync {directive}\ntrue\n"
    )
    assert job_id is None and result.returncode != 0
    assert "Burst Buffer request invalid" in result.stderr
    # Slurm 22.05 passes the lua's message on to sbatch.
    assert message in result.stderr, result.stderr


def test_unstageable_version_holds_the_job_with_the_reason(world: World) -> None:
    version_id = world.register("drive/gone", {"g.bin": 100_000}, "gone")
    shutil.rmtree(world.root / "pipeline" / "runs" / "gone")  # the only source is gone
    job_id, submitted = world.cluster.sbatch(
        "gone", "#!/bin/bash\n#BB_LUA datasync dataset=drive/gone@v1 site=lustre name=GONE\ntrue\n"
    )
    assert job_id is not None, submitted.stderr
    deadline = time.monotonic() + 90
    job = world.cluster.job(job_id)
    while job["priority"] not in {"0", "0.00000000000000"} and time.monotonic() < deadline:
        time.sleep(0.5)
        job = world.cluster.job(job_id)
    try:
        assert job["state"] == "PENDING", job
        assert float(job["priority"]) == 0, job  # held: an admin must release it
        # The job shows datasync's reason, naming the file that cannot be had.
        for text in (job["reason"], job["system_comment"]):
            assert "datasync: drive/gone@v1 at site lustre failed: " in text, job
            assert "g.bin" in text, job
        # The same request, asked again, re-plans the FAILED placement and fails again
        # (exit 4) with a reason naming the file. Its words may differ from the job's: the
        # job saw the worker's "missing at source", a re-plan knows no replica is left.
        again = world.datasync(
            "stage", "drive/gone@v1", "--site", "lustre", "--job-id", f"slurm:dstest:{job_id}",
            "--json", check=False,
        )  # fmt: skip
        assert again.returncode == 4
        reason = json.loads(again.stdout)["reason"]
        assert "g.bin" in reason, reason
        assert version_id not in os.listdir(world.root / "lustre" / "drive")
    finally:
        world.cluster.run("scancel", str(job_id))


HARNESS = r"""
-- Calls the hooks as Slurm >= 24.05 does (it has test_data_in and slurm.SLURM_BB_BUSY).
slurm = { SUCCESS = 0, ERROR = -1, SLURM_BB_BUSY = "BUSY",
          log_info = function(...) end }
dofile(arg[1] .. "/burst_buffer.lua")
local job_id, script, path_file, bad_script = arg[2], arg[3], arg[4], arg[5]
local job_info = { start_time = os.time() + 120 }
local function show(what, rc, msg, seconds)
  io.write(string.format("%s %d %s %.1f\n", what, rc, tostring(msg), seconds))
  io.flush()
end
local t = os.time()
local rc, msg = slurm_bb_job_process(bad_script, "1000", "1000", job_info)
show("job_process(bad)", rc, msg, 0)
rc, msg = slurm_bb_job_process(script, "1000", "1000", job_info)
show("job_process", rc, msg, 0)
rc, msg = slurm_bb_data_in(job_id, script, "1000", "1000", job_info)
show("data_in", rc, msg, os.time() - t)
for i = 1, 240 do
  rc, msg = slurm_bb_test_data_in(job_id, script, "1000", "1000", job_info)
  show("test_data_in", rc, msg, os.time() - t)
  if rc ~= 0 or msg ~= "BUSY" then break end
  os.execute("sleep 0.5")
end
rc, msg = slurm_bb_paths(job_id, script, path_file, "1000", "1000", job_info)
show("paths", rc, msg, os.time() - t)
rc, msg = slurm_bb_job_teardown(job_id, script, "false", "1000", "1000")
show("teardown", rc, msg, os.time() - t)
"""


@pytest.fixture
def api_url(world: World) -> Iterator[str]:
    """``datasync serve`` on a free loopback port, for the lua's ``api=`` mode."""
    port = _free_port()
    with (world.root / "serve.log").open("ab") as log:
        server = subprocess.Popen(
            [DATASYNC, "serve", "--port", str(port)], env=world.env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(
            ["curl", "-sf", f"{url}/api/v1/health"], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline and server.poll() is None, (
                "datasync serve did not start"
            )
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("mode", ["cli", "api"])
def test_polling_hooks_of_newer_slurm(
    world: World, tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    lua = shutil.which("lua5.1")
    if lua is None:
        pytest.skip("lua5.1 not installed: run `make system-deps`")
    dataset = f"drive/poll-{mode}"
    version_id = world.register(dataset, {f"p{i}.bin": 2 * MIB for i in range(4)}, f"poll-{mode}")
    job_id = {"cli": "990001", "api": "990002"}[mode]
    here = world.cluster.dir
    if mode == "api":
        # The same script beside slurm.conf, with datasync-bb.conf naming the HTTP API.
        here = tmp_path / "slurm"
        here.mkdir()
        for name in ("burst_buffer.lua", "slurm.conf", "burst_buffer.conf"):
            shutil.copy(world.cluster.dir / name, here / name)
        # The hook's own token (role hook), in a file only the hook reads: curl gets it on
        # stdin (the lua never puts it on a command line).
        token = tmp_path / "token"
        world.datasync("token", "create", f"bb-{job_id}", "--role", "hook", "-o", str(token))
        (here / "datasync-bb.conf").write_text(
            f"api={request.getfixturevalue('api_url')}/\ntoken_file={tmp_path / 'token'}\n"
        )
    script, bad = tmp_path / "script", tmp_path / "bad"
    script.write_text(f"#!/bin/bash\n#BB_LUA datasync dataset={dataset}@v1 site=lustre name=POLL\n")
    bad.write_text(f"#!/bin/bash\n#BB_LUA datasync dataset={dataset}@v1 site=mars name=POLL\n")
    # Slurm's own state directory for the job: stage-in leaves the view's path there.
    job_dir = world.cluster.dir / "state" / f"hash.{int(job_id) % 10}" / f"job.{job_id}"
    job_dir.mkdir(parents=True)
    harness = tmp_path / "harness.lua"
    harness.write_text(HARNESS)
    argv = [lua, str(harness), str(here), job_id, str(script), str(job_dir / "path"), str(bad)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    calls = [line.split(" ", 2) for line in result.stdout.splitlines()]
    assert calls[0][:2] == ["job_process(bad)", "-1"]
    assert "unknown site 'mars' (sites: lustre, pipeline)" in calls[0][2], calls[0]
    assert calls[1][:3] == ["job_process", "0", "nil 0.0"]
    data_in = calls[2]
    assert data_in[:2] == ["data_in", "0"] and data_in[2].startswith("nil "), calls
    # data_in only records the request: it returns before the bytes have moved.
    polls = [c for c in calls if c[0] == "test_data_in"]
    assert polls[0][1:2] == ["0"] and polls[0][2].startswith("BUSY "), calls
    assert polls[-1][1] == "0" and polls[-1][2].startswith("nil "), calls
    assert float(data_in[2].split()[1]) < float(polls[-1][2].split()[1])
    assert [c[:2] for c in calls[-2:]] == [["paths", "0"], ["teardown", "0"]], calls
    view = world.root / "lustre" / "drive" / f"poll-{mode}" / version_id
    assert (job_dir / "path").read_text() == f"DATASYNC_POLL_PATH={view}\n"
    assert world.pins_of(f"slurm:dstest:{job_id}") == (0, 0)
