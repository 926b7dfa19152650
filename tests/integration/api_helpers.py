"""Helpers of the API tests: tokens of any role, a TestClient that sends one, a settings
environment with a POSIX site, and a real ``datasync serve`` on a free loopback port."""

from __future__ import annotations

import itertools
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from datasync.api import create_app
from datasync.auth import ADMIN_TOKEN_FILE, Role
from datasync.bootstrap import App

_names = itertools.count(1)
DATASYNC = Path(sys.executable).with_name("datasync")


def bearer(app: App, role: Role = Role.ADMIN, namespaces: Iterable[str] = ()) -> dict[str, str]:
    """``Authorization`` header of a new token of ``role``."""
    issued = app.tokens.create(f"test-{role.value}-{next(_names)}", role, namespaces)
    return {"Authorization": f"Bearer {issued.token}"}


def admin_client(app: App) -> TestClient:
    """A TestClient over ``create_app(app)`` that sends an admin token (use it in ``with``)."""
    return TestClient(create_app(app), headers=bearer(app))


def site_env(tmp_path: Path, db_url: str) -> dict[str, str]:
    """Settings environment with one POSIX site, ``lustre``, rooted at ``tmp_path/site``."""
    (tmp_path / "site").mkdir(exist_ok=True)
    config = tmp_path / "datasync.toml"
    config.write_text(f'[sites.lustre]\nurl = "{tmp_path / "site"}"\n')
    return {
        "DATASYNC_HOME": str(tmp_path / "home"),
        "DATASYNC_DATABASE_URL": db_url,
        "DATASYNC_CONFIG": str(config),
    }


def free_port() -> int:
    """A loopback port nothing listens on (until someone binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def served_admin_token(home: Path, timeout: float = 120.0) -> str:
    """The token a starting ``datasync serve``/``up`` writes to ``home/admin.token``."""
    path = home / ADMIN_TOKEN_FILE
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.1)
    return path.read_text().strip()


@dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:PORT
    pid: int


@contextmanager
def serving(
    env: dict[str, str],
    *args: str,
    log: Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Server]:
    """``datasync serve ARGS`` on a free port, answering ``/health``: its base URL
    (``https://`` with ``tls``, the context that trusts its certificate) and pid. Its output
    goes to ``log``."""
    port = free_port()
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [DATASYNC, "serve", "--port", str(port), *args], env=env, stdout=out, stderr=out
    )
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/api/v1/health", timeout=5, verify=tls or True)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "datasync serve exited"
                assert time.monotonic() < deadline, "datasync serve did not start"
                time.sleep(0.2)
        yield Server(base, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if log is not None:
            out.close()  # type: ignore[union-attr]
