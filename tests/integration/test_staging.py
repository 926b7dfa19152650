"""Stage requests through the CLI, as a job hook uses them, on SQLite and PostgreSQL.

The view a READY request points at is hashed with ``xxh128sum`` (independent of datasync).
Exit codes are the hook's contract: 0 ready, 2 bad input, 3 timeout, 4 failed for good.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col
from typer.testing import CliRunner

from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.db.ops_tables import Pin, StageRequest
from datasync.transfer.supervisor import WorkerOptions, run_worker
from tests.fixtures.replication import Site, make_tree, posix_site, settings_for
from tests.integration.test_integrity import _env, assert_posix_view

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)


@pytest.fixture
def lab(tmp_path: Path, db_url: str) -> Iterator[tuple[App, Site, Site, dict[str, bytes]]]:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre]))
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run")
    app.service.register("drive/cam", str(pipeline.root / "run"), label="v1")
    try:
        yield app, pipeline, lustre, files
    finally:
        app.close()


def _stage(app: App, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    result = CliRunner().invoke(
        cli_app, ["stage", *args, "--json"], env=_env(app), catch_exceptions=False
    )
    doc = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, doc, result.stderr


def _pins(app: App) -> list[tuple[int, str]]:
    with app.engine.connect() as conn:
        rows = conn.execute(sa.select(col(Pin.placement_id), col(Pin.holder))).all()
    return sorted((int(p), str(h)) for p, h in rows)


def test_stage_is_idempotent_per_job_and_pins_until_released(
    lab: tuple[App, Site, Site, dict[str, bytes]],
) -> None:
    app, _pipeline, _lustre, _files = lab
    code, first, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--job-id", "42")
    assert code == 0 and first is not None and first["state"] == "TRANSFERRING"
    code, again, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--job-id", "42")
    assert again is not None and again["request"] == first["request"]
    code, other, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--job-id", "43")
    assert other is not None and other["request"] != first["request"]
    assert other["placement"] == first["placement"]  # one placement, two jobs
    assert _pins(app) == [(first["placement"], "job:42"), (first["placement"], "job:43")]
    result = CliRunner().invoke(
        cli_app, ["release", "--job-id", "42", "--json"], env=_env(app), catch_exceptions=False
    )
    assert json.loads(result.stdout)["released"] == [first["placement"]]
    assert _pins(app) == [(first["placement"], "job:43")]
    with app.engine.connect() as conn:
        released = conn.execute(
            sa.select(col(StageRequest.job_id)).where(col(StageRequest.released_at).is_not(None))
        ).all()
    assert [r[0] for r in released] == ["42"]


def test_stage_wait_returns_the_verified_view_path(
    lab: tuple[App, Site, Site, dict[str, bytes]],
) -> None:
    app, _pipeline, lustre, files = lab
    assert lustre.root is not None
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(app.settings,),
        kwargs={"processes": 0, "stop_event": stop, "options": FAST},
    )
    worker.start()
    try:
        code, doc, _ = _stage(
            app, "drive/cam@v1", "--site", "lustre", "--job-id", "7", "--wait", "--timeout", "60"
        )
    finally:
        stop.set()
        worker.join(60)
    assert code == 0 and doc is not None and doc["state"] == "READY"
    version_id = doc["ref"].split("@")[1]
    assert doc["path"] == f"{lustre.root}/drive/cam/{version_id}"
    assert_posix_view(lustre.root, "drive/cam", version_id, files)
    # Already resident: at once, without a worker.
    code, again, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--job-id", "8", "--wait")
    assert code == 0 and again is not None and again["path"] == doc["path"]


def test_stage_exit_codes_for_bad_input_timeout_and_failure(
    lab: tuple[App, Site, Site, dict[str, bytes]], tmp_path: Path
) -> None:
    app, pipeline, _lustre, _files = lab
    assert pipeline.root is not None
    for bad in (
        ["drive/nope@v1", "--site", "lustre"],
        ["drive/cam@v9", "--site", "lustre"],
        ["drive/cam@v1", "--site", "mars"],
        ["drive/cam@v1", "--site", "lustre", "--deadline", "soon"],
        ["drive/cam@v1", "--site", "lustre", "--job-id", "has space"],
    ):
        code, _doc, err = _stage(app, *bad)
        assert code == 2 and err.startswith("datasync: error:"), (bad, err)
    code, doc, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--dry-run")
    assert code == 0 and doc is not None and doc["state"] == "VALID" and doc["request"] is None
    assert _pins(app) == [], "a dry run records nothing"
    # No worker runs: --wait times out (3), and the request stays.
    code, doc, err = _stage(
        app, "drive/cam@v1", "--site", "lustre", "--job-id", "9", "--wait", "--timeout", "0.5"
    )
    assert code == 3 and doc is not None and "the request stays" in err
    assert (doc["placement"], "job:9") in _pins(app)
    # A version registered from outside every site has no source: it fails for good (4).
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"x" * 100)
    app.service.register("drive/gone", str(outside), label="v1")
    code, doc, err = _stage(app, "drive/gone@v1", "--site", "lustre", "--wait", "--timeout", "5")
    assert code == 4 and doc is not None and doc["state"] == "FAILED"
    assert "no usable replica" in err


def test_explain_says_why_the_data_is_not_there_yet(
    lab: tuple[App, Site, Site, dict[str, bytes]],
) -> None:
    app, pipeline, _lustre, _files = lab
    assert pipeline.root is not None
    make_tree(pipeline.root / "other", seed=9)
    app.service.register("drive/other", str(pipeline.root / "other"), label="v1")
    _, first, _ = _stage(app, "drive/other@v1", "--site", "lustre", "--deadline", "+10m")
    _, mine, _ = _stage(app, "drive/cam@v1", "--site", "lustre", "--deadline", "+2h")
    assert first is not None and mine is not None
    result = CliRunner().invoke(
        cli_app,
        ["explain", "drive/cam@v1", "--site", "lustre", "--json"],
        env=_env(app),
        catch_exceptions=False,
    )
    why = json.loads(result.stdout)
    assert [p["phase"] for p in why["phases"]] == ["PLANNING", "TRANSFERRING"]
    assert why["queue_position"] >= 1, "the other placement, due sooner, is ahead"
    assert any("no worker has claimed a task" in b for b in why["blockers"])
    assert any("ahead in the queue" in b for b in why["blockers"])
    assert why["pins"] == ["1 stage request(s) not released", f"job:{mine['job_id']}"]
    assert why["slack_seconds"] is not None and why["slack_seconds"] > 3600
    text = (
        CliRunner()
        .invoke(cli_app, ["explain", "drive/cam@v1", "--site", "lustre"], env=_env(app))
        .stdout
    )
    assert "queue position:" in text and "blocked: no worker has claimed" in text
    missing = CliRunner().invoke(
        cli_app, ["explain", "drive/cam@v1", "--site", "pipeline"], env=_env(app)
    )
    assert missing.exit_code == 2 and "has no placement at 'pipeline'" in missing.stderr
