"""Placement service functions on SQLite and PostgreSQL: replicate (idempotent, re-plan,
reprioritize), source replicas from a registration under a site, status (progress,
throughput, ETA, at-risk, errors), sites (capabilities, health); plus the CLI and API
over the same functions."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from datasync.bootstrap import bootstrap
from datasync.config import Settings
from datasync.db.engine import write_transaction
from datasync.db.transfer_tables import Placement
from datasync.errors import TransientError, UnknownReference, UserError
from datasync.events import EventBus
from datasync.manifest.store import ManifestStore
from datasync.transfer.exec import SiteBackends
from datasync.transfer.planner import Planner
from datasync.transfer.service import ReplicationService
from datasync.transfer.siteindex import SiteIndex
from datasync.transfer.sites import list_sites, site_for_source
from datasync.transfer.status import NO_WORKER_AFTER, NO_WORKER_MESSAGE, parse_deadline
from tests.fixtures.transfer import (
    FixedRetry,
    entry_for,
    fake_entry,
    make_state,
    record_blobs,
    record_sources,
    register,
    settings_with,
    tasks_of,
    version_pk,
)
from tests.integration.api_helpers import bearer, served_admin_token


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    (tmp_path / "pipeline" / "runs").mkdir(parents=True)
    (tmp_path / "lustre").mkdir()
    return settings_with(
        tmp_path,
        db_url,
        {
            "pipeline": str(tmp_path / "pipeline"),
            "lustre": str(tmp_path / "lustre"),
            "aws": "s3://bucket/prod",
        },
    )


@pytest.fixture
def replication(engine: Engine, settings: Settings) -> ReplicationService:
    state = make_state(engine, EventBus())
    planner = Planner(engine, settings, state)
    backends = SiteBackends(settings.sites)
    store = ManifestStore(engine)
    return ReplicationService(
        settings, engine, store, state, planner, backends, lambda: None, lambda *_: None
    )


def test_site_for_source_finds_the_site_root(settings: Settings, tmp_path: Path) -> None:
    runs = tmp_path / "pipeline" / "runs"
    assert site_for_source(settings, str(runs)) == ("pipeline", "runs/")
    assert site_for_source(settings, f"directory:{runs}") == ("pipeline", "runs/")
    assert site_for_source(settings, str(tmp_path / "pipeline")) == ("pipeline", "")
    assert site_for_source(settings, f"file://{runs}") == ("pipeline", "runs/")
    assert site_for_source(settings, "pipeline:runs/7") == ("pipeline", "runs/7/")
    assert site_for_source(settings, "s3://bucket/prod/drive/x") == ("aws", "drive/x/")
    assert site_for_source(settings, "s3://bucket/production") is None  # not a path prefix
    assert site_for_source(settings, "s3://other/prod") is None
    assert site_for_source(settings, str(tmp_path / "elsewhere")) is None
    assert site_for_source(settings, "manifest:/tmp/m.jsonl") is None


def test_record_source_replicas_uses_relative_keys(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    entries = [fake_entry("a/1.bin", "1", 10), fake_entry("b.bin", "2", 20)]
    version = register(engine, "drive/src", entries)
    vpk = version_pk(engine, version)
    runs = tmp_path / "pipeline" / "runs"
    assert record_sources(engine, settings, vpk, str(runs)) == 2
    sources = SiteIndex(engine).sources_for(entries[0].digest, dst="lustre")
    assert [(s.site, s.key, s.kind) for s in sources] == [("pipeline", "runs/a/1.bin", "source")]
    # Idempotent, and a replica found bad stays bad until re-checked or refreshed.
    state = make_state(engine)
    state.replicas.mark_bad("pipeline", entries[1].digest, "runs/b.bin", "checksum mismatch")
    assert record_sources(engine, settings, vpk, str(runs)) == 0
    assert SiteIndex(engine).sources_for(entries[1].digest, dst="lustre") == []
    # A registration that hashed the files again, or --from naming them, refreshes them.
    assert state.replicas.record_sources("pipeline", "runs/", vpk, refresh=True) == 2
    assert [s.ok for s in SiteIndex(engine).sources_for(entries[1].digest, dst="x")] == [True]


def test_replicate_is_idempotent_and_updates_priority(
    engine: Engine, replication: ReplicationService, tmp_path: Path
) -> None:
    runs = tmp_path / "pipeline" / "runs"
    version = register(
        engine, "drive/rep", [entry_for("x.bin", b"x" * 100)], source=f"directory:{runs}"
    )
    first = replication.replicate("drive/rep@latest", "lustre")
    assert first.state == "TRANSFERRING" and first.files_total == 1
    assert first.tasks == {"queued": 2}  # one blob batch + publish
    again = replication.replicate(f"drive/rep@{version.version_id[:8]}", "lustre")
    assert again.id == first.id and len(tasks_of(engine, first.id)) == 2
    soon = datetime.now(UTC) + timedelta(hours=1)
    bumped = replication.replicate("drive/rep", "lustre", priority=7, deadline=soon)
    assert bumped.priority == 7 and bumped.deadline is not None
    assert {(t.priority, t.deadline is not None) for t in tasks_of(engine, first.id)} == {(7, True)}
    (claimed, *_) = make_state(engine).tasks.claim("w", 1, 60)
    assert claimed.priority == 7 and claimed.deadline is not None
    assert abs((claimed.deadline - soon).total_seconds()) < 1


def test_replicate_replans_a_failed_placement(
    engine: Engine, replication: ReplicationService, tmp_path: Path
) -> None:
    register(engine, "drive/again", [fake_entry("x.bin", "x", 10)], source="/not/a/site")
    failed = replication.replicate("drive/again", "lustre")
    assert failed.state == "FAILED" and "no usable replica" in (failed.error or "")
    record_blobs(engine, "aws", [fake_entry("x.bin", "x", 10)])
    fixed = replication.replicate("drive/again", "lustre")
    assert fixed.id == failed.id and fixed.state == "TRANSFERRING" and fixed.error is None


def test_replicate_rejects_bad_input(engine: Engine, replication: ReplicationService) -> None:
    register(engine, "drive/bad", [fake_entry("x", "x", 1)])
    with pytest.raises(UserError, match=r"unknown site 'mars'.*aws, lustre, pipeline"):
        replication.replicate("drive/bad", "mars")
    with pytest.raises(UnknownReference):
        replication.replicate("drive/bad@v9", "lustre")


def test_status_reports_progress_throughput_eta_and_errors(
    engine: Engine, replication: ReplicationService, tmp_path: Path
) -> None:
    runs = tmp_path / "pipeline" / "runs"
    entries = [fake_entry(f"f{i}", f"s{i}", 1000) for i in range(4)]
    register(engine, "drive/st", entries, source=f"directory:{runs}")
    from datasync.transfer.planner import PlannerConfig

    placement = replication.replicate(
        "drive/st",
        "lustre",
        deadline=datetime.now(UTC) - timedelta(seconds=1),
        planner=PlannerConfig(batch_items=1),
    )
    assert placement.at_risk  # the deadline has passed and it is not READY
    queue = make_state(engine).tasks
    one, two, *_ = queue.claim("w", 2, 60)
    assert queue.complete("w", one.id, 1000)
    queue.fail("w", two.id, TransientError("connection reset by peer"))
    (row,) = replication.status(placement_id=placement.id)
    assert (row.files_done, row.bytes_done) == (1, 1000)
    assert (row.files_total, row.bytes_total) == (4, 4000)
    assert row.throughput_bytes_per_second > 0
    assert row.eta_seconds is not None and row.eta_seconds > 0
    assert row.tasks == {"done": 1, "queued": 4}
    assert row.phase == (
        "3 task(s) waiting for a worker; 1 task(s) waiting for the tasks they depend on"
    )
    slow = make_state(engine, retry=FixedRetry(3600)).tasks
    (three,) = slow.claim("w", 1, 60)
    slow.fail("w", three.id, TransientError("reset"))
    (row,) = replication.status(placement_id=placement.id)
    assert row.phase.startswith("2 task(s) waiting for a worker; 1 task(s) backing off")
    assert "1 task(s) backing off after errors until 20" in row.phase
    assert row.last_errors[0]["class"] == "TransientError"
    assert row.last_errors[0]["message"] == "connection reset by peer"
    assert replication.status(active_only=True)[0].id == placement.id
    assert replication.status(dataset="drive/other") == []


def test_status_says_plainly_when_no_worker_claims_the_due_work(
    engine: Engine, replication: ReplicationService, tmp_path: Path
) -> None:
    runs = tmp_path / "pipeline" / "runs"
    register(engine, "drive/nw", [fake_entry("f", "s", 1000)], source=f"directory:{runs}")
    placement = replication.replicate("drive/nw", "lustre")
    (row,) = replication.status(placement_id=placement.id)
    assert row.phase.startswith("1 task(s) waiting for a worker;")  # just queued: no verdict
    assert NO_WORKER_MESSAGE not in row.phase
    # Half a minute later nothing has claimed it (no worker runs in this test).
    past = datetime.now(UTC) - NO_WORKER_AFTER - timedelta(seconds=5)
    with write_transaction(engine) as conn:
        conn.execute(sa.update(Placement).values(updated_at=past))
    (row,) = replication.status(placement_id=placement.id)
    assert row.phase.startswith(f"1 task(s) waiting for a worker: {NO_WORKER_MESSAGE};")
    # A worker that claimed something lately is alive: the plain wording comes back.
    (task,) = make_state(engine).tasks.claim("w", 1, 60)
    make_state(engine).tasks.fail("w", task.id, TransientError("reset"))
    (row,) = replication.status(placement_id=placement.id)
    assert NO_WORKER_MESSAGE not in row.phase, row.phase


def test_list_sites_reports_capabilities_and_health(settings: Settings, tmp_path: Path) -> None:
    local = settings.model_copy(
        update={
            "sites": {
                "lustre": settings.sites["lustre"],
                "gone": settings.sites["lustre"].model_copy(
                    update={"url": "memory://sites-gone", "options": {"create": False}}
                ),
            }
        }
    )
    infos = {s.name: s for s in list_sites(local, timeout=10)}
    assert infos["lustre"].healthy is True and infos["lustre"].backend == "file"
    assert infos["lustre"].capabilities is not None
    assert infos["lustre"].capabilities["hard_links"] is True
    assert infos["gone"].healthy is False and "NotFound" in (infos["gone"].error or "")
    quiet = {s.name: s for s in list_sites(local, probe=False)}
    assert quiet["gone"].healthy is None and quiet["gone"].capabilities is not None


def test_parse_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_deadline("+2h", now=now) == now + timedelta(hours=2)
    assert parse_deadline("+30m", now=now) == now + timedelta(minutes=30)
    assert parse_deadline("2026-02-01T10:00:00") == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert parse_deadline(None) is None
    for bad in ("+2x", "tomorrow", "+h"):
        with pytest.raises(UserError):
            parse_deadline(bad)


@contextmanager
def _serve(api: FastAPI, headers: dict[str, str]) -> Iterator[httpx.Client]:
    """The app on a real uvicorn server on a free loopback port, and a client for it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def _toml(settings: Settings, tmp_path: Path) -> Path:
    lines = [f'database_url = "{settings.database_url}"', "chunk_size = 1048576"]
    for name, site in settings.sites.items():
        lines += [f"[sites.{name}]", f'url = "{site.url}"']
    path = tmp_path / "datasync.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_and_api_serve_the_same_functions(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasync.api.app import create_app
    from datasync.cli import app as cli_app

    runs = tmp_path / "pipeline" / "runs"
    (runs / "cam").mkdir()
    (runs / "cam" / "0.jpg").write_bytes(b"frame" * 100)
    (runs / "big.bin").write_bytes(bytes(range(256)) * 5000)
    local = settings.model_copy(
        update={"sites": {k: v for k, v in settings.sites.items() if k != "aws"}}
    )
    monkeypatch.setenv("DATASYNC_CONFIG", str(_toml(local, tmp_path)))
    monkeypatch.setenv("DATASYNC_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    reg = runner.invoke(cli_app, ["register", "drive/cli", str(runs), "--json"])
    assert reg.exit_code == 0, reg.output
    out = runner.invoke(cli_app, ["replicate", "drive/cli", "--to", "lustre", "--json"])
    assert out.exit_code == 0, out.output
    placement = json.loads(out.stdout)
    assert placement["state"] == "TRANSFERRING" and placement["files_total"] == 2
    bad = runner.invoke(cli_app, ["replicate", "drive/cli", "--to", "mars"])
    assert bad.exit_code == 2 and "unknown site 'mars'" in bad.output
    st = runner.invoke(cli_app, ["status", "--json"])
    assert st.exit_code == 0 and json.loads(st.stdout)[0]["id"] == placement["id"]
    sites = runner.invoke(cli_app, ["sites", "--json"])
    assert {s["name"] for s in json.loads(sites.stdout)} == {"pipeline", "lustre"}
    done = runner.invoke(cli_app, ["worker", "--once", "--processes", "1"])
    assert done.exit_code == 0, done.output
    st = runner.invoke(cli_app, ["status", "--all", "--json"])
    assert json.loads(st.stdout)[0]["state"] == "READY"
    view = tmp_path / "lustre" / "drive" / "cli@latest"
    assert (view / "big.bin").read_bytes() == (runs / "big.bin").read_bytes()

    with (
        bootstrap(local) as application,
        _serve(create_app(application), bearer(application)) as client,
    ):
        listed = client.get("/api/v1/placements").json()
        assert [p["state"] for p in listed] == ["READY"]
        one = client.get(f"/api/v1/placements/{placement['id']}").json()
        assert one["files_done"] == 2
        assert client.get("/api/v1/placements/999").status_code == 404
        again = client.post("/api/v1/placements", json={"ref": "drive/cli", "site": "lustre"})
        assert again.status_code == 200 and again.json()["id"] == placement["id"]
        unknown = client.post("/api/v1/placements", json={"ref": "drive/cli", "site": "mars"})
        assert unknown.status_code == 400 and "mars" in unknown.json()["error"]
        sites = client.get("/api/v1/sites", params={"probe": "true"}).json()
        assert {s["name"]: s["healthy"] for s in sites} == {"lustre": True, "pipeline": True}


def test_up_runs_api_scheduler_and_workers_together(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from datasync.cli import app as cli_app

    runs = tmp_path / "pipeline" / "runs"
    (runs / "a.bin").write_bytes(b"a" * 3000)
    local = settings.model_copy(
        update={"sites": {k: v for k, v in settings.sites.items() if k != "aws"}}
    )
    env = {
        **os.environ,
        "DATASYNC_CONFIG": str(_toml(local, tmp_path)),
        "DATASYNC_HOME": str(tmp_path / "home"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    assert runner.invoke(cli_app, ["register", "drive/up", str(runs)]).exit_code == 0
    out = runner.invoke(cli_app, ["replicate", "drive/up", "--to", "lustre", "--json"])
    placement = json.loads(out.stdout)["id"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [Path(sys.executable).with_name("datasync"), "up", "--port", str(port), "-p", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        auth = {"Authorization": f"Bearer {served_admin_token(tmp_path / 'home')}"}
        state = None
        for _ in range(600):
            try:
                url = f"http://127.0.0.1:{port}/api/v1/placements/{placement}"
                reply = httpx.get(url, headers=auth)
                state = reply.json()["state"]
            except httpx.TransportError:
                pass
            if state == "READY":
                break
            time.sleep(0.1)
        assert state == "READY"
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=90)[0].decode(errors="replace")
    assert proc.returncode == 0, output
    assert (tmp_path / "lustre" / "drive" / "up@latest" / "a.bin").read_bytes() == b"a" * 3000


def test_replicate_from_names_where_a_manifest_versions_files_are(
    engine: Engine, replication: ReplicationService
) -> None:
    entry = fake_entry("cam/0.jpg", "frame0", 10)
    register(engine, "drive/produced", [entry], source="manifest:/tmp/produced.jsonl")
    with pytest.raises(UserError, match="not under any configured site"):
        replication.replicate("drive/produced", "lustre", source="/somewhere/else")
    result = replication.replicate("drive/produced", "lustre", source="aws:run7")
    assert result.state == "TRANSFERRING"
    sources = SiteIndex(engine).sources_for(entry.digest, dst="lustre")
    assert [(s.site, s.key) for s in sources] == [("aws", "run7/cam/0.jpg")]


def test_a_dead_planner_is_replanned_once(engine: Engine, replication: ReplicationService) -> None:
    entry = fake_entry("a", "a", 10)
    register(engine, "drive/stale", [entry], source="aws:x")
    placement = replication.replicate("drive/stale", "lustre")
    assert replication.replan_stale() == 0  # fresh: nothing to do
    # The planner "died" long ago, halfway: PLANNING, publish still on its planning hold.
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with write_transaction(engine) as conn:
        conn.exec_driver_sql("DELETE FROM tasks WHERE kind = 'blobs'")
        conn.exec_driver_sql("UPDATE tasks SET blocked_by = 1")
    with write_transaction(engine) as conn:
        conn.execute(sa.update(Placement).values(state="PLANNING", updated_at=long_ago))
    assert replication.replan_stale() == 1
    assert replication.replan_stale() == 0
    (row,) = replication.status(placement_id=placement.id)
    assert row.state == "TRANSFERRING" and row.tasks == {"queued": 2}
    claimed = make_state(engine).tasks.claim("w", 5, 60)
    assert [t.kind for t in claimed] == ["blobs"]
