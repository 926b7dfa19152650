"""Tokens for API tests: headers for a token of any role, a TestClient that sends one, and
the embedded admin token a real ``datasync serve``/``up`` writes to its home."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from pathlib import Path

from fastapi.testclient import TestClient

from datasync.api import create_app
from datasync.auth import ADMIN_TOKEN_FILE, Role
from datasync.bootstrap import App

_names = itertools.count(1)


def bearer(app: App, role: Role = Role.ADMIN, namespaces: Iterable[str] = ()) -> dict[str, str]:
    """``Authorization`` header of a new token of ``role``."""
    issued = app.tokens.create(f"test-{role.value}-{next(_names)}", role, namespaces)
    return {"Authorization": f"Bearer {issued.token}"}


def admin_client(app: App) -> TestClient:
    """A TestClient over ``create_app(app)`` that sends an admin token (use it in ``with``)."""
    return TestClient(create_app(app), headers=bearer(app))


def served_admin_token(home: Path, timeout: float = 120.0) -> str:
    """The token a starting ``datasync serve``/``up`` writes to ``home/admin.token``."""
    path = home / ADMIN_TOKEN_FILE
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.1)
    return path.read_text().strip()
