"""schemathesis against the OpenAPI document of a live ``datasync serve``: zero 5xx, zero
schema violations.

Every check runs (``--checks all``): responses conform to the documented status codes,
content types, headers and schemas; requests that violate the schema are refused (4xx);
requests without the token are refused (``ignored_auth``); ``Allow`` names the methods a
path serves. One allowance: a schema-valid request may still be refused as bad input (400,
404, 409, 422) where the rule depends on the server's state, which no schema can say (an
unknown site, a path outside every site, a token name taken, a manifest's content), so
``positive_data_acceptance`` accepts those statuses. Independently of schemathesis, the
server's own log must show no 5xx and no traceback. Runs on SQLite and PostgreSQL; the
seed is fixed (``DATASYNC_SCHEMATHESIS_SEED`` changes it) so that a failure reproduces.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from datasync.auth import Role
from datasync.bootstrap import bootstrap
from datasync.config import load_settings
from tests.integration.api_helpers import admin_client, serving, site_env

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422"]
"""


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    tmp_path: Path, db_url: str
) -> None:
    env = {**os.environ, **site_env(tmp_path, db_url)}
    (tmp_path / "site" / "run" / "cam0").mkdir(parents=True)
    (tmp_path / "site" / "run" / "cam0" / "000001.jpg").write_bytes(b"frame")
    # The documented examples name real things: drive/tokyo-urban@v1, a placement.
    with bootstrap(load_settings(env=env)) as app:
        app.service.register("drive/tokyo-urban", "lustre:run", label="v1")
        app.replication.replicate("drive/tokyo-urban@v1", "lustre")
        # A name schemathesis cannot guess: DELETE /tokens/{name} must not revoke it.
        token = app.tokens.create(f"schemathesis-{secrets.token_hex(8)}", Role.ADMIN).token
    log_path = tmp_path / "serve.log"
    with serving(env, log=log_path) as server:
        (tmp_path / "schemathesis.toml").write_text(CONFIG)
        seed = os.environ.get("DATASYNC_SCHEMATHESIS_SEED", "20261129")
        schemathesis = Path(sys.executable).with_name("schemathesis")
        spec = f"{server.base}/api/v1/openapi.json"
        args = [
            str(schemathesis), "--config-file", str(tmp_path / "schemathesis.toml"), "run", spec,
            "--header", f"Authorization: Bearer {token}", "--checks", "all",
            "--max-examples", "60", "--seed", seed, "--workers", "1",
        ]  # fmt: skip
        run = subprocess.run(
            args,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
                "PYTHONPATH": str(REPO),
                "NO_COLOR": "1",
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
    served = log_path.read_text()
    assert not re.search(r'HTTP/1\.1" 5\d\d', served), served[-5000:]
    assert "Traceback" not in served, served[-5000:]
    assert token not in served and token not in output


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[TestClient]:
    env = {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": db_url}
    with bootstrap(load_settings(env=env)) as app, admin_client(app) as c:
        yield c


NUL = "\x00"
FAR = "9999-12-31T23:59:59-05:00"  # year 10000 in UTC


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "message"),
    [
        # Names are checked before the database sees them (PostgreSQL refuses NUL in text).
        ("get", "/placements", {"params": {"dataset": f"a{NUL}b"}}, "invalid dataset name"),
        ("get", "/placements", {"params": {"site": NUL}}, "unknown site"),
        ("delete", "/tokens/a%00b", {}, None),
        ("post", "/placements", {"json": {"ref": "d/a", "site": "s", "deadline": FAR}}, "year"),
        ("post", "/tokens", {"json": {"name": "t", "role": "hook", "expires": FAR}}, "year"),
        ("post", "/placements", {"json": {"ref": "d/a", "site": "s", "priority": 2**31}}, "less"),
        ("get", f"/placements/{2**63}", {}, "placement_id"),
        # Found by the properties in tests/unit/test_properties.py:
        ("post", "/datasets/d/a/versions/manifest", {"content": b"[" * 10**5}, "too deeply"),
        ("put", "/labels", {"json": {"ref": "d/a", "label": "v1\n"}}, "invalid label"),
        ("get", "/diff", {"params": {"old": "d/a\n@v1", "new": "d/a"}}, "invalid dataset name"),
    ],
)
def test_what_fuzzing_found_is_refused_as_bad_input(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any], message: str | None
) -> None:
    """Found next to schemathesis, by hand: on PostgreSQL a NUL in text is a DataError
    (it was a 500), and a deadline past 9999 in UTC was stored, after which no placement
    could be read (every status request failed)."""
    r = getattr(client, method)("/api/v1" + path, **kwargs)
    assert r.status_code < 500, r.text
    if message is not None:
        assert r.status_code in (400, 422) and message in r.json()["error"], r.text
    elif r.status_code == 400:
        assert "NUL" in r.json()["error"], r.text
    assert client.get("/api/v1/placements").status_code == 200
    assert client.get("/api/v1/tokens").status_code == 200
