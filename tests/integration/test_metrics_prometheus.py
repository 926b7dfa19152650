"""A real Prometheus (Debian ``prometheus``) scrapes a real ``datasync up`` while it replicates.

``datasync up --processes 2`` on PostgreSQL moves every byte in its worker processes,
never in the API process that serves ``/metrics``: a byte counter that matches proves the
multiprocess aggregation. Prometheus scrapes every second with the project's alert rules
loaded. The test then asks Prometheus's HTTP API:

* ``datasync_transfer_bytes_total`` per link equals ``bytes_moved`` of ``datasync status
  --json`` per placement, and ``datasync_transfer_files_total`` its ``files_done``;
* the queue, active-transfer and placement gauges are back to idle, two workers live;
* every alert rule evaluates without error and none fires, and every query of the
  Grafana dashboard is accepted;
* after ``datasync up`` is restarted the counters still hold the same totals (dead
  processes' files are folded, never dropped) and Prometheus saw no reset.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.observe.servers import (
    Daemon,
    datasync_env,
    free_port,
    make_files,
    run_json,
    start,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
DATASET = "drive/metrics"


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not installed: make system-deps (Debian package prometheus)")
    return found


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        rules = workdir / "alerts.yml"
        shutil.copy(REPO / "deploy/prometheus/alerts.yml", rules)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(rules))}]\n"
            "scrape_configs:\n  - job_name: datasync\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n",
            encoding="utf-8",
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        until(lambda: self._ready(), 60, "prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def world(tmp_path: Path, pg_url: str, prometheus_bin: str) -> Iterator[dict[str, Any]]:
    home = tmp_path / "home"
    pipeline, lustre, backup = (tmp_path / n for n in ("pipeline", "lustre", "backup"))
    for root in (pipeline, lustre, backup):
        root.mkdir()
    write_config(home, {"pipeline": str(pipeline), "lustre": str(lustre), "backup": str(backup)})
    env = datasync_env(home, pg_url)
    make_files(pipeline / "run1", 400, 2_000, 60_000)
    (pipeline / "run1" / "shards").mkdir()
    (pipeline / "run1" / "shards" / "big.bin").write_bytes(bytes(range(256)) * 20_000)
    port = free_port()
    daemons: list[Daemon] = []

    def up() -> Daemon:
        daemon = start(
            env, tmp_path / f"up-{len(daemons)}.log", "up", "--processes", "2", port=port
        )
        daemons.append(daemon)
        return daemon

    prometheus = Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{port}")
    try:
        yield {"env": env, "up": up, "prometheus": prometheus, "run": pipeline / "run1"}
    finally:
        for daemon in daemons:
            daemon.stop()
        prometheus.stop()


def test_prometheus_sees_exactly_the_bytes_moved_and_an_idle_engine(world: dict[str, Any]) -> None:
    env, prom = world["env"], world["prometheus"]
    reg = run_json(
        env, "register", DATASET, str(world["run"]), "--label", "v1", "--chunk-size", "1MiB"
    )
    daemon: Daemon = world["up"]()
    until(lambda: prom.query('up{job="datasync"} == 1') != [], 60, "a first scrape")
    assert prom.values("sum(datasync_transfer_bytes_total)", "") in ({}, {"": 0.0})

    for site in ("lustre", "backup"):
        done = run_json(env, "replicate", f"{DATASET}@v1", "--to", site, "--wait", timeout=300)
        assert done["state"] == "READY", done
    status = {p["site"]: p for p in run_json(env, "status", "--all")}
    moved = {site: status[site]["bytes_moved"] for site in ("lustre", "backup")}
    files = {site: status[site]["files_done"] for site in ("lustre", "backup")}
    assert all(n > 0 for n in moved.values()) and files == {
        "lustre": reg["files"],
        "backup": reg["files"],
    }

    def caught_up() -> bool:
        seen = prom.values("sum by (dst) (datasync_transfer_bytes_total)", "dst")
        idle = prom.values("max by (state) (datasync_queue_tasks)", "state")
        return seen == {k: float(v) for k, v in moved.items()} and set(idle.values()) == {0.0}

    until(caught_up, 60, "Prometheus to scrape the final counters and an idle queue")
    # Each link is labelled with real sites (backup may read from lustre, the cheaper copy).
    links = prom.query("sum by (src, dst) (datasync_transfer_bytes_total)")
    assert {s["metric"]["src"] for s in links} <= {"pipeline", "lustre"}, links
    assert prom.values("sum by (dst) (datasync_transfer_files_total)", "dst") == {
        k: float(v) for k, v in files.items()
    }
    placements = prom.values("sum by (state) (datasync_placements)", "state")
    assert placements == {"READY": 2.0}, placements
    assert set(prom.values("max by (site) (datasync_active_transfers)", "site").values()) == {0.0}
    assert prom.values('sum(datasync_workers{state="live"})', "") == {"": 2.0}
    assert prom.values("sum(datasync_placements_finished_total)", "") == {"": 2.0}
    assert prom.values("max(datasync_database_up)", "") == {"": 1.0}

    # Every rule evaluates cleanly against the real series, and an idle engine fires none.
    rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
    assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
    assert prom.query("ALERTS") == []
    # Every Grafana query parses and runs.
    dashboard = json.loads((REPO / "deploy/grafana/datasync.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            prom.query(re.sub(r"\$__rate_interval", "1m", target["expr"]))

    # Restart: the workers' files are folded into the archive, the totals stay.
    assert daemon.stop() == 0, daemon.tail()
    before = time.time()
    world["up"]()

    def rescraped() -> bool:
        got = prom.query("timestamp(datasync_database_up)")
        return bool(got) and float(got[0]["value"][1]) > before + 1

    until(rescraped, 60, "a scrape of the restarted server")
    assert prom.values("sum by (dst) (datasync_transfer_bytes_total)", "dst") == {
        k: float(v) for k, v in moved.items()
    }
    assert prom.values("sum(resets(datasync_transfer_bytes_total[10m]))", "") == {"": 0.0}
