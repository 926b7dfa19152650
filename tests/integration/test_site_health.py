"""Timeouts sized to the request, and sites that say what is wrong (issue 13, item 8).

A real socket server that accepts TCP connections and never answers plays the hung
endpoint; a closed port plays the one that refuses. Each object store (S3, Azure, GCS)
must fail a small request within its read-timeout floor and give a large one the time its
bytes need; its error names the endpoint (``host:port``). ``datasync sites`` reports both
endpoints DOWN by name and exits 1, and a worker's ``SiteHealth`` chore pauses the tasks of
such a site (with the reason, in ``status`` and ``explain``) instead of letting them burn
their attempts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col
from typer.testing import CliRunner

from datasync.backends.registry import open_backend
from datasync.bootstrap import bootstrap
from datasync.cli import app as cli_app
from datasync.config import SiteConfig
from datasync.db.transfer_tables import Task
from datasync.errors import DatasyncError, TransientError
from datasync.events import SitePaused, TaskRetried
from datasync.transfer.sites import SiteHealth
from datasync.transfer.state.tasks import SITE_DOWN
from datasync.transfer.worker import WorkerOptions
from tests.fixtures.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    S3_KEYS,
    ErrorServer,
    closed_port,
)
from tests.fixtures.replication import Site, make_tree, posix_site, settings_for
from tests.fixtures.transfer import Recorder

MiB = 1024 * 1024


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts every connection and never
    sends a byte (a hung load balancer, a stopped process behind a live socket)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def _options(kind: str, endpoint: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    """A site URL and options for ``kind`` that talk to ``endpoint``."""
    if kind == "s3":
        return "s3://bucket/x", {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            **S3_KEYS,
            **extra,
        }
    if kind == "azure":
        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
        )
        return f"az://{AZURITE_ACCOUNT}/container/x", {"connection_string": connection, **extra}
    return "gs://bucket/x", {"endpoint": endpoint, "project": "test", **extra}


def _timed(call: Callable[[], object]) -> tuple[float, BaseException]:
    start = time.monotonic()
    with pytest.raises(TransientError) as caught:
        call()
    return time.monotonic() - start, caught.value


KINDS = ["s3", "azure", "gcs"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_small_request_to_a_hung_endpoint_fails_within_the_floor(
    kind: str, silent_endpoint: str
) -> None:
    url, options = _options(kind, silent_endpoint, read_timeout=1)
    backend = open_backend(url, options)
    try:
        elapsed, error = _timed(lambda: backend.stat("k"))
    finally:
        backend.close()
    # The 1 s floor, not the 10 s default nor the SDKs' 60-120 s (slack for a busy box).
    assert 0.9 < elapsed < 8.0, elapsed
    assert f"talking to {silent_endpoint.removeprefix('http://')}" in str(error)
    assert isinstance(error, DatasyncError) and error.retryable


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_request_gets_time_for_its_bytes(kind: str, silent_endpoint: str) -> None:
    """read timeout = floor + bytes / min_rate: 1 s + 3 MiB at 1 MiB/s = 4 s."""
    url, options = _options(kind, silent_endpoint, read_timeout=1, min_rate_bytes=MiB)
    backend = open_backend(url, options)
    try:
        elapsed, error = _timed(lambda: backend.read_range("k", 0, 3 * MiB))
    finally:
        backend.close()
    assert 3.8 < elapsed < 20.0, elapsed  # the bytes' share, not the SDKs' 60-120 s
    assert "talking to 127.0.0.1:" in str(error)


def test_the_default_floor_is_ten_seconds(silent_endpoint: str) -> None:
    url, options = _options("s3", silent_endpoint)
    backend = open_backend(url, options)
    try:
        elapsed, _ = _timed(lambda: backend.stat("k"))
    finally:
        backend.close()
    assert 9.5 < elapsed < 14.0, elapsed


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_connection_names_the_endpoint(kind: str) -> None:
    port = closed_port()
    url, options = _options(kind, f"http://127.0.0.1:{port}")
    backend = open_backend(url, options)
    try:
        # The first call also builds the SDK client (service models, pools): seconds on a
        # loaded box. The second is the refused connection alone.
        _timed(lambda: backend.stat("k"))
        elapsed, error = _timed(lambda: backend.stat("k"))
    finally:
        backend.close()
    assert f"talking to 127.0.0.1:{port}" in str(error) and elapsed < 5.0


def _config(tmp_path: Path, sites: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, str]:
    lines = []
    for name, (url, options) in sites.items():
        lines.append(f"[sites.{name}]\nurl = {json.dumps(url)}\n")
        if options:
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
            lines.append(f"options = {{ {pairs} }}\n")
    config = tmp_path / "datasync.toml"
    config.write_text("".join(lines))
    return {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_CONFIG": str(config)}


def test_sites_names_the_endpoints_that_are_down_and_exits_1(
    tmp_path: Path, silent_endpoint: str
) -> None:
    (tmp_path / "lustre").mkdir()
    refused = f"http://127.0.0.1:{closed_port()}"
    env = _config(
        tmp_path,
        {
            "lustre": (str(tmp_path / "lustre"), {}),
            "hung": _options("s3", silent_endpoint),
            "refused": _options("s3", refused),
        },
    )
    runner = CliRunner()
    start = time.monotonic()
    # 5 s: a refused connection fails at once, a busy 2-core box still answers in time.
    result = runner.invoke(cli_app, ["sites", "--timeout", "5", "--json"], env=env)
    assert time.monotonic() - start < 20
    assert result.exit_code == 1, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["lustre"]["healthy"] is True and rows["lustre"]["endpoint"] is None
    hung = silent_endpoint.removeprefix("http://")
    assert rows["hung"]["healthy"] is False and rows["hung"]["endpoint"] == hung
    assert rows["hung"]["error"] == f"no answer from {hung} within 5s"
    down = rows["refused"]
    assert down["healthy"] is False and down["endpoint"] == refused.removeprefix("http://")
    assert f"network error: EndpointConnectionError talking to {down['endpoint']}" in down["error"]
    assert result.stderr == "datasync: error: site(s) down: hung, refused\n"
    table = runner.invoke(cli_app, ["sites", "--timeout", "5"], env=env)
    assert table.exit_code == 1 and f"DOWN: no answer from {hung}" in table.stdout
    quiet = runner.invoke(cli_app, ["sites", "--no-probe"], env=env)
    assert quiet.exit_code == 0, quiet.output


def _queued(app_engine: sa.engine.Engine, site: str) -> list[Any]:
    with app_engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(
                    col(Task.id), col(Task.not_before), col(Task.attempts), col(Task.errors)
                ).where(
                    col(Task.state) == "queued",
                    sa.or_(col(Task.dst_site) == site, col(Task.src_site) == site),
                )
            )
        )


def test_a_site_that_is_down_pauses_its_tasks_with_the_reason(tmp_path: Path, db_url: str) -> None:
    port = closed_port()
    src = posix_site("pipeline", tmp_path / "pipeline")
    url, options = _options("s3", f"http://127.0.0.1:{port}")
    dead = Site("dead", SiteConfig(url=url, options=options), "s3")
    make_tree(tmp_path / "pipeline" / "run", seed=3)
    settings = settings_for(tmp_path / "home", db_url, [src, dead])
    with bootstrap(settings) as app:
        version = app.service.register_directory("drive/down", tmp_path / "pipeline" / "run")
        placement = app.replication.replicate(f"drive/down@{version.version_id}", "dead")
        held = _queued(app.engine, "dead")
        assert held and all(row.attempts == 0 for row in held)
        seen = Recorder()
        app.bus.subscribe(seen)
        # A refused port answers at once; 15 s keeps a busy box from making it "no answer".
        health = SiteHealth(settings, app.engine, app.state.tasks.pause_site, timeout=15, pause=120)
        assert health.check() == {}  # nothing failed yet: nothing is probed
        # A worker retried one of the site's tasks: the site becomes a suspect.
        health.on_event(
            TaskRetried(
                task_id=held[0].id,
                placement_id=placement.id,
                kind="blobs",
                error_class="TransientError",
                message="network error",
                attempt=1,
                delay_seconds=1.0,
            )
        )
        before = datetime.now(UTC)
        paused = health.check()
        assert list(paused) == ["dead"]  # the pipeline site answers: it is not paused
        assert f"talking to 127.0.0.1:{port}" in paused["dead"]
        (event,) = seen.of(SitePaused)
        assert event.site == "dead" and event.tasks == len(held)
        for row in _queued(app.engine, "dead"):
            assert row.attempts == 0  # no attempt was spent
            not_before = (
                row.not_before if row.not_before.tzinfo else row.not_before.replace(tzinfo=UTC)
            )
            assert (not_before - before).total_seconds() > 100
            assert [e["class"] for e in row.errors] == [SITE_DOWN]
            assert row.errors[0]["message"] == paused["dead"]
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "TRANSFERRING" and "backing off after errors until" in st.phase
        why = app.explainer.explain(placement.id)
        assert any(e["class"] == SITE_DOWN and "127.0.0.1" in e["message"] for e in why.last_errors)
        # Still down at the next check: paused again, and the history does not grow.
        assert list(health.check()) == ["dead"]
        assert all(len(row.errors) == 1 for row in _queued(app.engine, "dead"))


def test_a_worker_suspects_a_site_at_its_first_network_retry_and_pauses_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The wiring of ``App.worker``: the chore runs in every worker, and a call retried
    after a network error makes its site a suspect at once (not only a failed task)."""
    port = closed_port()
    url, options = _options("s3", f"http://127.0.0.1:{port}")
    src = posix_site("pipeline", tmp_path / "pipeline")
    make_tree(tmp_path / "pipeline" / "run", seed=6)
    dead = Site("dead", SiteConfig(url=url, options=options), "s3")
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dead])
    with bootstrap(settings) as app:
        version = app.service.register_directory("drive/down", tmp_path / "pipeline" / "run")
        app.replication.replicate(f"drive/down@{version.version_id}", "dead")
        loop = app.worker(WorkerOptions())
        try:
            (health,) = [
                owner
                for chore in loop.parts.chores
                if isinstance(owner := getattr(chore, "__self__", None), SiteHealth)
            ]
            with pytest.raises(TransientError):  # retried within the call, then given up
                loop.executor.ctx.backends["dead"].stat("k")
            assert list(health.check()) == ["dead"]
            assert all(row.errors[-1]["class"] == SITE_DOWN for row in _queued(app.engine, "dead"))
        finally:
            loop.close()


def test_a_throttling_site_is_not_paused(
    tmp_path: Path, sqlite_url: str, error_server: ErrorServer
) -> None:
    """503 SlowDown is the site pacing us (the AIMD limits' business), not the site down."""
    error_server.headers = {"Retry-After": "1"}
    url, options = _options("s3", error_server.url)
    busy = Site("busy", SiteConfig(url=url, options=options), "s3")
    settings = settings_for(tmp_path / "home", sqlite_url, [busy])
    with bootstrap(settings) as app:
        health = SiteHealth(settings, app.engine, app.state.tasks.pause_site, timeout=5)
        health.suspect("busy")
        assert health.check() == {}
        assert error_server.requests >= 1  # it was probed
        (info,) = app.replication.sites(timeout=5)
        assert info.healthy is False and "Throttled" in (info.error or "")
