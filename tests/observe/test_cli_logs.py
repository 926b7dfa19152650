"""Logs and status from the command line, as operators meet them.

Real ``datasync`` processes: ``worker`` logs a task's failure as a structured record (it
used to print nothing), ``DATASYNC_LOG`` is honoured by a one-shot command, a bad level
is refused, and ``status`` shows a failed placement's whole reason, wrapped.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console
from sqlmodel import col
from typer.testing import CliRunner

from datasync.cli import app as cli_app
from datasync.cli import replication
from datasync.db.engine import create_engine, write_transaction
from datasync.db.transfer_tables import Placement
from datasync.transfer.status import PlacementStatus
from tests.observe.servers import datasync_env, make_files, run, run_json, write_config


def _records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _world(tmp_path: Path) -> tuple[dict[str, str], Path]:
    home, pipeline, lustre = tmp_path / "home", tmp_path / "pipeline", tmp_path / "lustre"
    pipeline.mkdir()
    lustre.mkdir()
    write_config(home, {"pipeline": str(pipeline), "lustre": str(lustre)})
    return datasync_env(home, f"sqlite:///{home / 'datasync.db'}"), pipeline


def test_worker_logs_task_failures_as_json(tmp_path: Path) -> None:
    env, pipeline = _world(tmp_path)
    files = make_files(pipeline / "run", 6, 100, 400)
    run_json(env, "register", "drive/logs", str(pipeline / "run"))
    victim = sorted(files)[2]
    (pipeline / "run" / victim).write_bytes(b"!" * len(files[victim]))
    run_json(env, "replicate", "drive/logs@latest", "--to", "lustre")
    done = run(env, "worker", "--once", "--log-format", "json", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(done.stderr)
    failed = [r for r in records if r.get("action") == "task.failed"]
    assert len(failed) == 1, done.stderr[-3000:]
    assert failed[0]["level"] == "error" and failed[0]["error_class"] == "ChecksumMismatch"
    assert victim in failed[0]["message"] and failed[0]["site"] == "lustre"
    assert any(r.get("action") == "placement.failed" for r in records)
    assert all({"ts", "level", "logger", "pid", "msg"} <= set(r) for r in records)


def test_datasync_log_is_honoured_by_every_command(tmp_path: Path) -> None:
    env, pipeline = _world(tmp_path)
    make_files(pipeline / "run", 3, 100, 200)
    quiet = run(env, "register", "drive/a", str(pipeline / "run"), "--json")
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run(
        {**env, "DATASYNC_LOG": "DEBUG", "DATASYNC_LOG_FORMAT": "json"},
        "register", "drive/b", str(pipeline / "run"), "--json",
    )  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    records = _records(loud.stderr)
    assert any(
        r.get("action") == "version.registered" and r["dataset"] == "drive/b" for r in records
    )
    assert all(r["level"] in ("debug", "info", "warning") for r in records)
    bad = run({**env, "DATASYNC_LOG": "CHATTY"}, "datasets")
    assert bad.returncode == 2 and "unknown log level 'CHATTY'" in bad.stderr


def test_status_shows_the_whole_reason_wrapped(tmp_path: Path) -> None:
    env, pipeline = _world(tmp_path)
    make_files(pipeline / "run", 3, 100, 200)
    version = run_json(env, "register", "drive/c", str(pipeline / "run"))
    placement = run_json(env, "replicate", f"drive/c@{version['version_id']}", "--to", "lustre")
    reason = (
        "blobs task 2 failed (permanent error): PermissionDenied: az://devstoreaccount1/"
        "container-with-a-long-name/.datasync/blobs/ab/cd/" + "f" * 32 + ": the service refused "
        "the credentials of this site; check its connection string and the role assignment END"
    )
    engine = create_engine(env["DATASYNC_DATABASE_URL"])
    try:
        with write_transaction(engine) as conn:
            conn.execute(
                sa.update(Placement)
                .where(col(Placement.id) == placement["id"])
                .values(state="FAILED", error=reason)
            )
    finally:
        engine.dispose()
    result = CliRunner().invoke(cli_app, ["status", "--all"], env=env)
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # wrapped over several lines, never cut
    assert "".join(reason.split()) in "".join(flat.split("│"))


def _status(state: str, done: int, phase: str) -> PlacementStatus:
    now = datetime.now(UTC)
    return PlacementStatus(
        id=7, dataset="drive/w", version_id="ab" * 32, site="lustre", state=state, priority=0,
        deadline=None, created_at=now, updated_at=now, files_done=done // 10, files_total=10,
        bytes_done=done, bytes_total=100, throughput_bytes_per_second=10.0, eta_seconds=1.0,
        at_risk=False, tasks={}, bytes_moved=done, error=None, last_errors=[], phase=phase,
    )  # fmt: skip


def test_replicate_wait_draws_a_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("datasync.cli.replication.time.sleep", lambda _s: None)
    polls = iter([_status("TRANSFERRING", 40, "2 task(s) running"), _status("READY", 100, "ready")])
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    first = _status("PLANNING", 0, "planning: comparing the version with what the site holds")
    first = first.model_copy(update={"bytes_total": 0, "files_total": 0})
    last = replication.watch(first, lambda: next(polls), console=console)
    assert last.state == "READY"
    text = out.getvalue()
    assert "#7 drive/w@abababababab -> lustre" in text and "100%" in text and "READY: ready" in text
    # Not a terminal: one plain status line per poll, the planning one without a percentage.
    plain = io.StringIO()
    polls = iter([_status("READY", 100, "ready")])
    replication.watch(first, lambda: next(polls), console=Console(file=plain, width=160))
    assert plain.getvalue().startswith("#7 drive/w@abababababab -> lustre: PLANNING")
    assert "(-)" in plain.getvalue()
