"""Every route of ``/api/v1`` x every role: refused outside its rights, allowed inside.

The expected rights are written out here, independently of ``datasync.auth.roles``, and the
table must name every route the app serves: a new route without a row fails
``test_the_matrix_names_every_route``. Each route is called with no token, a bogus token, a
revoked and an expired one (401), with each role's token on a dataset of the owner's
namespace ``drive`` (allowed or 403), and, for the routes an owner may use, on a dataset of
another namespace ``other`` (403 for the owner, allowed for the others). Runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlmodel import col

from datasync.api import API_PREFIX, create_app
from datasync.api.auth import api_routes, requires_token
from datasync.auth import Role
from datasync.bootstrap import App, bootstrap
from datasync.config import load_settings
from datasync.db.ops_tables import ApiToken
from tests.integration.api_helpers import site_env
from tests.integration.manifest_helpers import entries

V1 = API_PREFIX
ROLES = ("admin", "ops", "hook", "owner")  # "owner" owns the namespace "drive"
ALL = frozenset(ROLES)
PUBLIC = {("GET", f"{V1}/health")}


@dataclass
class World:
    app: App
    client: TestClient
    tokens: dict[str, str]  # role -> token
    placements: dict[str, int]  # namespace -> a placement id there
    manifest: bytes
    names: Iterator[int]
    requests: dict[str, int]  # namespace -> a stage request there

    def call(self, request: Request, role: str | None, token: str | None = None) -> Any:
        method, path, kwargs = request(self)
        secret = token if token is not None else self.tokens[role] if role else None
        headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        return self.client.request(method, path, headers=headers, **kwargs)


Request = Callable[[World], tuple[str, str, dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    """A route, who may call it, and a request for the namespace ``ns`` (``drive`` or
    ``other``). ``scoped``: an owner may call it within its namespaces only."""

    method: str
    template: str
    allowed: frozenset[str]
    make: Callable[[World, str], tuple[str, dict[str, Any]]]
    scoped: bool = False

    def request(self, ns: str) -> Request:
        def build(world: World) -> tuple[str, str, dict[str, Any]]:
            path, kwargs = self.make(world, ns)
            return self.method, V1 + path, kwargs

        return build


def _token_body(world: World, _ns: str) -> tuple[str, dict[str, Any]]:
    return "/tokens", {"json": {"name": f"made-{next(world.names)}", "role": "hook"}}


def _revocable(world: World, _ns: str) -> tuple[str, dict[str, Any]]:
    name = f"gone-{next(world.names)}"
    world.app.tokens.create(name, Role.HOOK)
    return f"/tokens/{name}", {}


OWNERS = frozenset({"admin", "owner"})
HOOKS = frozenset({"admin", "hook"})
OPS = frozenset({"admin", "ops"})
MATRIX: list[Row] = [
    Row("GET", "/datasets", ALL, lambda w, ns: ("/datasets", {})),
    Row(
        "GET",
        "/datasets/{dataset}/versions",
        ALL,
        lambda w, ns: (f"/datasets/{ns}/a/versions", {}),
        True,
    ),
    Row(
        "POST",
        "/datasets/{dataset}/versions/manifest",
        OWNERS,
        lambda w, ns: (f"/datasets/{ns}/a/versions/manifest", {"content": w.manifest}),
        True,
    ),
    Row(
        "POST",
        "/datasets/{dataset}/versions/directory",
        OWNERS,
        lambda w, ns: (f"/datasets/{ns}/a/versions/directory", {"json": {"path": "lustre:run"}}),
        True,
    ),
    Row("GET", "/versions/{ref}", ALL, lambda w, ns: (f"/versions/{ns}/a@latest", {}), True),
    Row(
        "GET",
        "/versions/{ref}/manifest",
        ALL,
        lambda w, ns: (f"/versions/{ns}/a@v1/manifest", {}),
        True,
    ),
    Row(
        "GET",
        "/diff",
        ALL,
        lambda w, ns: ("/diff", {"params": {"old": "drive/a@v1", "new": f"{ns}/a@latest"}}),
        True,
    ),
    Row(
        "PUT",
        "/labels",
        OWNERS,
        lambda w, ns: ("/labels", {"json": {"ref": f"{ns}/a@v1", "label": "stable"}}),
        True,
    ),
    Row(
        "POST",
        "/placements",
        frozenset({"admin"}),
        lambda w, ns: ("/placements", {"json": {"ref": f"{ns}/a@v1", "site": "lustre"}}),
    ),
    Row(
        "GET",
        "/placements",
        ALL,
        lambda w, ns: ("/placements", {"params": {"dataset": f"{ns}/a"}}),
        True,
    ),
    Row(
        "GET",
        "/placements/{placement_id}",
        ALL,
        lambda w, ns: (f"/placements/{w.placements[ns]}", {}),
        True,
    ),
    Row(
        "GET",
        "/placements/{placement_id}/explain",
        ALL,
        lambda w, ns: (f"/placements/{w.placements[ns]}/explain", {}),
        True,
    ),
    Row(
        "POST",
        "/stage",
        HOOKS,
        lambda w, ns: (
            "/stage",
            {"json": {"ref": f"{ns}/a@v1", "site": "lustre", "job_id": f"j{next(w.names)}"}},
        ),
    ),
    Row(
        "GET",
        "/stage/{request_id}",
        ALL,
        lambda w, ns: (f"/stage/{w.requests[ns]}", {}),
        True,
    ),
    Row(
        "POST",
        "/stage/release",
        HOOKS,
        lambda w, ns: ("/stage/release", {"json": {"job_id": f"j{next(w.names)}"}}),
    ),
    Row("GET", "/sites", frozenset({"admin", "ops", "hook"}), lambda w, ns: ("/sites", {})),
    Row(
        "POST",
        "/placements/{placement_id}/retry",
        OPS,
        lambda w, ns: (f"/placements/{w.placements[ns]}/retry", {}),
    ),
    Row(
        "POST",
        "/sites/{site}/pause",
        OPS,
        lambda w, ns: ("/sites/lustre/pause", {"json": {"reason": "maintenance", "until": "+1h"}}),
    ),
    Row("POST", "/sites/{site}/resume", OPS, lambda w, ns: ("/sites/lustre/resume", {})),
    Row("GET", "/whoami", ALL, lambda w, ns: ("/whoami", {})),
    Row("GET", "/tokens", frozenset({"admin"}), lambda w, ns: ("/tokens", {})),
    Row("POST", "/tokens", frozenset({"admin"}), _token_body),
    Row("DELETE", "/tokens/{name}", frozenset({"admin"}), _revocable),
]


def _api_routes(app: App) -> dict[tuple[str, str], APIRoute]:
    routes = {}
    for route in api_routes(create_app(app)):
        if route.path.startswith(V1):
            for method in route.methods or ():
                routes[(method, route.path_format)] = route
    return routes


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    env = site_env(tmp_path, db_url)
    (tmp_path / "site" / "run").mkdir()
    (tmp_path / "site" / "run" / "frame.jpg").write_bytes(b"frame")
    rows = [{"path": e.path, "size": e.size, "digest": e.digest} for e in entries(3)]
    manifest = "\n".join(json.dumps(r) for r in [{"format": "datasync-producer/1"}, *rows])
    with bootstrap(load_settings(env=env)) as app, TestClient(create_app(app)) as client:
        placements, requests = {}, {}
        for ns in ("drive", "other"):
            app.service.register(f"{ns}/a", "lustre:run", label="v1")
            placements[ns] = app.replication.replicate(f"{ns}/a@v1", "lustre").id
            staged = app.staging.stage(f"{ns}/a@v1", "lustre", job_id=f"job-{ns}").request
            assert staged is not None
            requests[ns] = staged
        tokens = {role: app.tokens.create(role, Role(role), ()).token for role in ROLES[:3]}
        tokens["owner"] = app.tokens.create("owner", Role.OWNER, ["drive"]).token
        yield World(app, client, tokens, placements, manifest.encode(), itertools.count(), requests)


def test_the_matrix_names_every_route(world: World) -> None:
    served = _api_routes(world.app)
    named = {(row.method, V1 + row.template) for row in MATRIX}
    assert set(served) - PUBLIC == named
    unprotected = [key for key, route in served.items() if not requires_token(route)]
    assert unprotected == sorted(PUBLIC)


def test_every_role_is_refused_outside_its_rights_and_allowed_inside(world: World) -> None:
    wrong: list[str] = []
    for row, role in itertools.product(MATRIX, ROLES):
        for ns in ("drive", "other") if row.scoped else ("drive",):
            allowed = role in row.allowed and (role != "owner" or ns == "drive")
            r = world.call(row.request(ns), role)
            ok = r.status_code in (200, 201) if allowed else r.status_code == 403
            if not ok:
                wrong.append(f"{row.method} {row.template} as {role} on {ns}: {r.status_code}")
            elif not allowed:
                assert set(r.json()) == {"error"} and role in r.json()["error"]
    assert wrong == []


def test_without_a_valid_token_every_route_is_401(world: World) -> None:
    revoked = world.app.tokens.create("revoked", Role.ADMIN).token
    world.app.tokens.revoke("revoked")
    expired = world.app.tokens.create("expired", Role.ADMIN).token
    with world.app.engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(seconds=1)
        conn.execute(
            sa.update(ApiToken).where(col(ApiToken.name) == "expired").values(expires_at=past)
        )
    cases = {"none": None, "bogus": "x" * 43, "revoked": revoked, "expired": expired}
    wrong = []
    for row, (case, token) in itertools.product(MATRIX, cases.items()):
        r = world.call(row.request("drive"), None, token)
        if r.status_code != 401 or r.headers.get("www-authenticate") != "Bearer":
            wrong.append(f"{row.method} {row.template} with {case} token: {r.status_code}")
        elif token is not None:
            assert token not in r.text
    assert wrong == []
    messages = {case: world.call(MATRIX[0].request("drive"), None, t).json()["error"]
                for case, t in cases.items()}  # fmt: skip
    assert "missing credentials" in messages["none"]
    assert messages["bogus"] == "invalid token"
    assert "'revoked' was revoked" in messages["revoked"]
    assert "'expired' expired at" in messages["expired"]
    # Not a bearer scheme at all is the same as no token.
    basic = world.client.get(f"{V1}/datasets", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401


def test_an_owner_sees_its_namespaces_only(world: World) -> None:
    auth = {"Authorization": f"Bearer {world.tokens['owner']}"}
    assert world.client.get(f"{V1}/datasets", headers=auth).json() == ["drive/a"]
    listed = world.client.get(f"{V1}/placements", headers=auth).json()
    assert [p["dataset"] for p in listed] == ["drive/a"]
    admin = {"Authorization": f"Bearer {world.tokens['admin']}"}
    assert world.client.get(f"{V1}/datasets", headers=admin).json() == ["drive/a", "other/a"]
    me = world.client.get(f"{V1}/whoami", headers=auth).json()
    assert me == {"name": "owner", "role": "owner", "namespaces": ["drive"]}


def test_health_and_the_openapi_document_are_public(world: World) -> None:
    assert world.client.get(f"{V1}/health").json() == {"status": "ok"}
    spec = world.client.get(f"{V1}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            protected = (method.upper(), path) not in PUBLIC
            assert bool(op.get("security")) == protected, (method, path)
            assert ({"401", "403"} <= set(op["responses"])) == protected, (method, path)


def test_outside_the_api_only_the_dashboard_data_takes_a_token(world: World) -> None:
    """``/ui/data`` names datasets, paths and errors: ops and admin only. The page, its
    assets and ``/metrics`` (labels: sites, links, states, classes) are public."""
    outside = {
        (method, route.path_format): route
        for route in api_routes(create_app(world.app))
        if not route.path.startswith(V1)
        for method in route.methods or ()
    }
    protected = sorted(key for key, route in outside.items() if requires_token(route))
    assert protected == [("GET", "/ui/data")]
    assert world.client.get("/ui/data").status_code == 401
    for role in ROLES:
        r = world.client.get("/ui/data", headers={"Authorization": f"Bearer {world.tokens[role]}"})
        assert r.status_code == (200 if role in {"admin", "ops"} else 403), (role, r.text)
    assert (
        "placements"
        in world.client.get(
            "/ui/data", headers={"Authorization": f"Bearer {world.tokens['ops']}"}
        ).json()
    )
    for path in ("/ui", "/ui/app.js", "/metrics"):
        assert world.client.get(path).status_code == 200, path
