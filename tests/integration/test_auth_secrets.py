"""Secrets never appear in any output: known secrets are injected, then everything datasync
can print, log or answer is scanned for them.

The secrets: an S3 site's ``aws_secret_access_key``, an Azure site's ``connection_string``
(and the account key inside it), the password of the PostgreSQL URL, and API tokens. The
outputs: stdout and stderr of succeeding and failing CLI commands (a real process each,
a worker included), a real ``datasync serve``'s log and every response it gives (errors,
the OpenAPI document, every GET route as admin, refusals of revoked and wrong tokens), and,
in this process, every log record at DEBUG while the API, the services and a worker run.
The cloud endpoints are closed loopback ports, so every cloud call fails and its error text
is part of what is scanned. A new GET route (``/metrics``, ``/ui``) is scanned as soon as it
exists: the routes are read from the app.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from datasync.api import create_app
from datasync.api.auth import api_routes
from datasync.auth import Role
from datasync.bootstrap import bootstrap
from datasync.config import load_settings
from datasync.errors import DatasyncError
from datasync.transfer.supervisor import run_worker
from datasync.transfer.worker import WorkerOptions
from tests.integration.api_helpers import free_port, served_admin_token, serving

AWS_SECRET = "awsSECRETkey0fd9a1c4e8b2"
ACCOUNT_KEY = base64.b64encode(b"azure-SECRET-account-key-5d1e9b").decode()
PG_PASSWORD = "pgSECRETpassword5b7e"
EXE = Path(sys.executable).with_name("datasync")


@dataclass
class Setup:
    env: dict[str, str]
    home: Path
    secrets: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)

    def scan(self) -> list[str]:
        """Every (output, secret) pair where the secret shows, in any common spelling."""
        found = []
        for where, text in self.outputs.items():
            for name, secret in self.secrets.items():
                spellings = {secret, json.dumps(secret)[1:-1], secret.replace("/", "%2F")}
                if any(s in text for s in spellings):
                    found.append(f"{name} in {where}")
        return found


@pytest.fixture
def setup(tmp_path: Path, pg_url: str) -> Iterator[Setup]:
    site = tmp_path / "site"
    (site / "run").mkdir(parents=True)
    (site / "run" / "a.bin").write_bytes(b"a" * 3000)
    aws_port, azure_port = free_port(), free_port()
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:{azure_port}/devstoreaccount1;"
    )
    config = tmp_path / "datasync.toml"
    config.write_text(
        f"""
[sites.lustre]
url = "{site}"

[sites.aws]
url = "s3://bucket/prefix"
options = {{ endpoint_url = "http://127.0.0.1:{aws_port}", region_name = "us-east-1", \
aws_access_key_id = "AKIADATASYNCTEST", aws_secret_access_key = "{AWS_SECRET}", \
connect_timeout = 1, read_timeout = 1 }}

[sites.azure]
url = "az://devstoreaccount1/container/prefix"
options = {{ connection_string = "{connection}", connect_timeout = 1, read_timeout = 1 }}
"""
    )
    user, rest = pg_url.split("://", 1)[1].split("@", 1)
    url = f"postgresql+psycopg://{user}:{PG_PASSWORD}@{rest}"  # trust auth: still connects
    home = tmp_path / "home"
    env = {
        **os.environ,
        "DATASYNC_HOME": str(home),
        "DATASYNC_CONFIG": str(config),
        "DATASYNC_DATABASE_URL": url,
    }
    secrets = {
        "aws_secret_access_key": AWS_SECRET,
        "account key": ACCOUNT_KEY,
        "connection_string": connection,
        "database password": PG_PASSWORD,
    }
    yield Setup(env, home, secrets)


def _cli(
    setup: Setup, *args: str, code: int | None = None, env: dict[str, str] | None = None
) -> str:
    run = subprocess.run(
        [EXE, *args], env=env or setup.env, capture_output=True, text=True, timeout=300
    )
    if code is not None:
        assert run.returncode == code, (args, run.stdout, run.stderr)
    setup.outputs[f"datasync {' '.join(args)}"] = run.stdout + run.stderr
    return run.stdout


def _side_by_side(*runs: Callable[[], str]) -> list[str]:
    """Independent commands, run at once (each is a process that spends most of its life
    importing, and this test runs many); their results, in order."""
    with ThreadPoolExecutor(4) as pool:
        return [f.result() for f in [pool.submit(run) for run in runs]]


def _every_claimable_task_failed_once(setup: Setup, timeout: float = 120.0) -> None:
    """Wait until every task a worker could claim has an error in its history (each met
    a closed port), and at least one has."""
    engine = sa.create_engine(setup.env["DATASYNC_DATABASE_URL"])
    untried = sa.text(
        "SELECT count(*) FILTER (WHERE errors::text = '[]' AND state IN ('queued', 'leased')"
        " AND blocked_by = 0), count(*) FILTER (WHERE errors::text <> '[]') FROM tasks"
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left, tried = conn.execute(untried).one()
            if left == 0 and tried > 0:
                return
            time.sleep(0.25)
        raise AssertionError(f"{left} claimable tasks never failed within {timeout}s")
    finally:
        engine.dispose()


def test_no_cli_output_holds_a_secret(setup: Setup) -> None:
    _cli(setup, "register", "drive/a", "lustre:run", "--label", "v1", "--json", code=0)
    _side_by_side(
        lambda: _cli(setup, "register", "drive/s3", "aws:run", code=1),
        lambda: _cli(setup, "register", "drive/az", "azure:run", code=1),
        lambda: _cli(setup, "sites", "--json"),
        lambda: _cli(setup, "sites"),
        lambda: _cli(setup, "replicate", "drive/a@v1", "--to", "aws", "--json", code=0),
        lambda: _cli(setup, "replicate", "drive/a@v1", "--to", "azure", "--json", code=0),
        lambda: _cli(setup, "replicate", "drive/a@v1", "--to", "nowhere", code=2),
        lambda: _cli(setup, "show", "drive/a@nope", code=2),
        lambda: _cli(setup, "verify", "lustre"),
    )
    worker = subprocess.Popen(
        [EXE, "worker", "--once"], env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    _every_claimable_task_failed_once(setup)  # each met a closed port: its error is scanned
    worker.send_signal(signal.SIGTERM)
    setup.outputs["datasync worker"] = worker.communicate(timeout=120)[0].decode()
    status = json.loads(_cli(setup, "status", "--all", "--json", code=0))
    assert any(p["last_errors"] or p["error"] for p in status), status  # errors were scanned
    created = json.loads(_cli(setup, "token", "create", "hook-1", "-r", "hook", "--json", code=0))
    setup.outputs.pop("datasync token create hook-1 -r hook --json")  # shows it, by design
    setup.secrets["hook token"] = created["token"]
    setup.secrets["admin token"] = served_admin_token(setup.home)
    down = {**setup.env}
    closed = f"@127.0.0.1:{free_port()}/"
    down["DATASYNC_DATABASE_URL"] = re.sub(r"@[^/]+/", closed, down["DATASYNC_DATABASE_URL"])
    assert PG_PASSWORD in down["DATASYNC_DATABASE_URL"]
    unreachable, *_ = _side_by_side(
        lambda: _cli(setup, "datasets", env=down),
        lambda: _cli(setup, "status", "--all"),
        lambda: _cli(setup, "token", "list", "--json", code=0),
        lambda: _cli(setup, "token", "list", code=0),
    )
    _cli(setup, "token", "revoke", "hook-1", code=0)
    _cli(setup, "token", "create", "hook-1", "-r", "hook", code=2)
    message = unreachable or setup.outputs["datasync datasets"]
    assert "cannot open database" in message
    assert setup.scan() == []


def test_no_api_answer_or_server_log_holds_a_secret(setup: Setup) -> None:
    with bootstrap(load_settings(env=setup.env)) as app:
        app.service.register("drive/a", "lustre:run", label="v1")
        hook = app.tokens.create("hook", Role.HOOK).token
        revoked = app.tokens.create("revoked", Role.HOOK).token
        app.tokens.revoke("revoked")
        paths = sorted(
            route.path_format
            for route in api_routes(create_app(app))
            if "GET" in (route.methods or ()) and "{" not in route.path_format
        )
    setup.secrets |= {"hook token": hook, "revoked token": revoked}
    log_path = setup.home / "serve.log"
    with serving(setup.env, log=log_path) as server:
        admin = served_admin_token(setup.home)
        setup.secrets["admin token"] = admin
        answers = []
        with httpx.Client(base_url=server.base, timeout=60) as client:
            for token in (admin, hook, revoked, admin + "x", None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                for path in [*paths, "/api/v1/sites?probe=true", "/docs", "/redoc"]:
                    answers.append(client.get(path, headers=headers))
                for body in (
                    {"ref": "drive/a@v1", "site": "aws"},
                    {"ref": "drive/a@v1", "site": "azure"},
                    {"ref": "drive/a@v1", "site": "aws", "deadline": "soon"},
                ):
                    answers.append(client.post("/api/v1/placements", json=body, headers=headers))
                answers.append(
                    client.post(
                        "/api/v1/datasets/drive/b/versions/directory",
                        json={"path": "azure:run"},
                        headers=headers,
                    )
                )
                answers.append(client.get("/api/v1/placements/1", headers=headers))
    assert {r.status_code for r in answers} >= {200, 400, 401, 403}
    for i, r in enumerate(answers):
        setup.outputs[f"{r.request.method} {r.request.url.path} #{i}"] = r.text + json.dumps(
            dict(r.headers)
        )
    setup.outputs["datasync serve log"] = log_path.read_text()
    assert setup.scan() == []


def test_no_log_record_at_debug_holds_a_secret(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with bootstrap(load_settings(env=setup.env)) as app:
        token = app.tokens.create("ops", Role.ADMIN).token
        setup.secrets["admin token"] = token
        app.service.register("drive/a", "lustre:run", label="v1")
        for name, source in (("drive/s3", "aws:run"), ("drive/az", "azure:run")):
            with pytest.raises(DatasyncError) as failed:
                app.service.register(name, source)
            texts.append(failed.value.message)
        texts += [s.model_dump_json() for s in app.replication.sites(probe=True, timeout=5)]
        for site in ("aws", "azure"):
            texts.append(app.replication.replicate("drive/a@v1", site).model_dump_json())
        with TestClient(create_app(app), headers={"Authorization": f"Bearer {token}"}) as client:
            for route in api_routes(client.app):  # type: ignore[arg-type]
                if "GET" in (route.methods or ()) and "{" not in route.path_format:
                    texts.append(client.get(route.path_format).text)
            texts.append(client.get("/api/v1/openapi.json").text)
        stop = threading.Event()
        timer = threading.Timer(8, stop.set)
        timer.start()
        try:
            run_worker(
                app.settings,
                processes=0,
                stop_event=stop,
                options=WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, grace=5),
            )
        finally:
            timer.cancel()
        texts += [p.model_dump_json() for p in app.replication.status()]
    assert any("aws" in t for t in texts)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG was captured
    setup.outputs["log records"] = "\n".join(
        f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    setup.outputs["in-process answers"] = "\n".join(texts)
    with sa.create_engine(setup.env["DATASYNC_DATABASE_URL"]).connect() as conn:
        tasks = conn.execute(sa.text("SELECT errors FROM tasks")).all()
        placements = conn.execute(sa.text("SELECT error FROM placements")).all()
    setup.outputs["errors in the database"] = repr(tasks) + repr(placements)
    assert setup.scan() == []


def test_the_scan_finds_a_secret_in_any_spelling(tmp_path: Path) -> None:
    setup = Setup({}, tmp_path, {"key": "a/b\\c"})
    setup.outputs = {"plain": "x a/b\\c y", "json": json.dumps({"k": "a/b\\c"}), "none": "a/b"}
    setup.outputs["url"] = "a%2Fb\\c"
    assert setup.scan() == ["key in plain", "key in json", "key in url"]
