"""Domain events become metrics and log records, in one process (single-process mode).

A real replication (POSIX to POSIX, a chunked file among small ones) and a failing one
(a source rewritten after registration) run through ``App.worker`` on the same ``App``
whose private registry is then read. Every number is compared with what the database
says independently: ``bytes_moved`` and ``files_done`` of the placement, the tasks'
rows, the distinct blobs. The log records carry the stable ``action`` keys, and the
``workers`` table holds the worker while it runs and nothing after.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from datasync.api.app import create_app
from datasync.auth import Role
from datasync.bootstrap import App, bootstrap
from datasync.db.ops_tables import WorkerRow
from datasync.observe.logs import JsonFormatter
from datasync.transfer.worker import WorkerOptions
from tests.fixtures.replication import make_tree, posix_site, settings_for, xxh
from tests.fixtures.transfer import tasks_of

MIB = 1024 * 1024
FAST = WorkerOptions(lease_seconds=5.0, idle_sleep=0.05, grace=5.0, queue_backoff_base=0.0)


def _value(registry: CollectorRegistry | None, name: str, **labels: str) -> float:
    assert registry is not None
    return registry.get_sample_value(name, labels) or 0.0


def _scrape(text: str) -> dict[tuple[str, ...], float]:
    """``(name, *label values sorted by label name) -> value`` of an exposition."""
    return {
        (sample.name, *(v for _, v in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _run_worker(app: App) -> list[int]:
    """Run this App's worker loop until idle; return the worker rows seen meanwhile."""
    seen: list[int] = []
    loop = app.worker(FAST)
    stop = threading.Event()

    def count() -> int:
        with app.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(WorkerRow)).scalar_one())

    def watch() -> None:
        while not stop.wait(0.05):
            seen.append(count())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        loop.run(threading.Event(), once=True)
    finally:
        loop.close()
        stop.set()
        watcher.join()
    return [*seen, count()]


def _app(tmp_path: Path, db_url: str) -> App:
    """An App over a "pipeline" POSIX site (sources under ``pipeline/run``) and "lustre"."""
    sites = [posix_site(name, tmp_path / name) for name in ("pipeline", "lustre")]
    return bootstrap(settings_for(tmp_path / "home", db_url, sites))


def test_a_replication_counts_what_the_database_says(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="datasync.events")
    files = make_tree(tmp_path / "pipeline" / "run", shards=(3 * MIB + 5,))
    app = _app(tmp_path, db_url)
    try:
        reg = app.service.register_directory(
            "drive/obs", tmp_path / "pipeline" / "run", chunk_size=MIB
        )
        placement = app.replication.replicate(f"drive/obs@{reg.version_id}", "lustre")
        seen_workers = _run_worker(app)
        status = app.replication.status(placement_id=placement.id)[0]
        assert status.state == "READY", status
        registry = app.observability.registry
        link = {"src": "pipeline", "dst": "lustre"}
        assert _value(registry, "datasync_transfer_bytes_total", **link) == status.bytes_moved > 0
        assert (
            _value(registry, "datasync_transfer_files_total", **link)
            == status.files_done
            == len(files)
        )
        blobs = len({xxh(data) for data in files.values()})
        assert _value(registry, "datasync_blobs_replicated_total", site="lustre") == blobs
        assert _value(registry, "datasync_chunk_parts_written_total", site="lustre") == 4
        rows = tasks_of(app.engine, placement.id)
        for kind in {r.kind for r in rows}:
            n = sum(1 for r in rows if r.kind == kind)
            assert _value(registry, "datasync_tasks_completed_total", kind=kind) == n, kind
            assert _value(registry, "datasync_tasks_claimed_total", kind=kind) == n, kind
            count = "datasync_task_duration_seconds_count"
            assert _value(registry, count, kind=kind, outcome="done") == n, kind
        assert _value(registry, "datasync_placements_created_total", site="lustre") == 1
        assert (
            _value(registry, "datasync_placements_finished_total", site="lustre", outcome="ready")
            == 1
        )
        assert _value(registry, "datasync_placement_duration_seconds_count", site="lustre") == 1
        assert _value(registry, "datasync_versions_registered_total", outcome="created") == 1
        assert (
            _value(registry, "datasync_db_statement_duration_seconds_count", statement="select") > 0
        )
        # The worker was registered while it ran, and deregistered at the end.
        assert max(seen_workers) == 1 and seen_workers[-1] == 0

        actions = [
            getattr(r, "action", None) for r in caplog.records if r.name == "datasync.events"
        ]
        for action in (
            "version.registered",
            "placement.created",
            "placement.planned",
            "task.claimed",
            "chunk.verified",
            "blob.replicated",
            "task.completed",
            "view.publishing",
            "view.published",
        ):
            assert action in actions, action
        published = next(
            r for r in caplog.records if getattr(r, "action", None) == "view.published"
        )
        doc = json.loads(JsonFormatter().format(published))
        assert doc["action"] == "view.published" and doc["level"] == "info"
        assert doc["placement_id"] == placement.id and doc["site"] == "lustre"
        assert doc["ref"] == f"drive/obs@{reg.version_id[:12]}"

        # /metrics shows the same counters and an idle queue.
        with TestClient(create_app(app)) as client:
            text = client.get("/metrics").text  # public: no dataset names in its labels
            assert client.get("/ui/data").status_code == 401  # names datasets: a token
            ops = app.tokens.create("dash", Role.OPS).token
            auth = {"Authorization": f"Bearer {ops}"}
            data: dict[str, Any] = client.get("/ui/data", headers=auth).json()
        scraped = _scrape(text)
        assert (
            scraped[("datasync_transfer_bytes_total", "lustre", "pipeline")] == status.bytes_moved
        )
        assert scraped[("datasync_placements", "lustre", "READY")] == 1
        assert scraped[("datasync_queue_tasks", "waiting")] == 0
        assert scraped[("datasync_database_up",)] == 1
        assert data["links"] == [
            {"src": "pipeline", "dst": "lustre", "bytes": status.bytes_moved, "files": len(files)}
        ]
        assert [p["id"] for p in data["placements"]] == [placement.id]
        assert data["queue"] == {
            "waiting": 0,
            "backoff": 0,
            "blocked": 0,
            "running": 0,
            "orphaned": 0,
        }
    finally:
        app.close()


def test_a_failing_replication_counts_and_logs_its_errors(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="datasync.events")
    run = tmp_path / "pipeline" / "run"
    files = make_tree(run)
    app = _app(tmp_path, db_url)
    try:
        reg = app.service.register_directory("drive/bad", run, chunk_size=MIB)
        victim = "cam0/000004.jpg"
        (run / victim).write_bytes(b"\0" * len(files[victim]))
        placement = app.replication.replicate(f"drive/bad@{reg.version_id}", "lustre")
        _run_worker(app)
        status = app.replication.status(placement_id=placement.id)[0]
        assert status.state == "FAILED" and status.error and victim in status.error
        registry = app.observability.registry
        failures = "datasync_task_failures_total"
        assert _value(registry, failures, kind="blobs", error_class="ChecksumMismatch") == 1
        assert (
            _value(registry, "datasync_replicas_marked_bad_total", site="pipeline", kind="source")
            == 1
        )
        assert (
            _value(registry, "datasync_placements_finished_total", site="lustre", outcome="failed")
            == 1
        )
        failed = [r for r in caplog.records if getattr(r, "action", None) == "task.failed"]
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR
        doc = json.loads(JsonFormatter().format(failed[0]))
        assert doc["error_class"] == "ChecksumMismatch" and victim in doc["message"]
        bad = [r for r in caplog.records if getattr(r, "action", None) == "replica.marked_bad"]
        assert bad and bad[0].levelno == logging.WARNING
        placement_failed = [
            r for r in caplog.records if getattr(r, "action", None) == "placement.failed"
        ]
        assert placement_failed and victim in placement_failed[0].getMessage()
    finally:
        app.close()
