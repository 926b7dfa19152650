"""The HTTP API over the real service and database (FastAPI TestClient over httpx)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from datasync.api import API_PREFIX
from datasync.bootstrap import App, bootstrap
from datasync.config import load_settings
from datasync.demo import MUTATED, generate, mutate
from tests.integration.api_helpers import admin_client, served_admin_token, serving, site_env
from tests.integration.manifest_helpers import entries, write_producer

V1 = API_PREFIX


@pytest.fixture
def application(tmp_path: Path, db_url: str) -> Iterator[App]:
    env = {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": db_url}
    with bootstrap(load_settings(env=env)) as app:
        yield app


@pytest.fixture
def client(application: App) -> Iterator[TestClient]:
    with admin_client(application) as c:
        yield c


def producer_body(tmp_path: Path, n: int = 20) -> bytes:
    rows = [{"path": e.path, "size": e.size, "digest": e.digest} for e in entries(n)]
    return write_producer(tmp_path / "m.jsonl", reversed(rows)).read_bytes()


def test_register_a_manifest_upload_then_show_label_export(
    client: TestClient, tmp_path: Path
) -> None:
    body = producer_body(tmp_path)
    url = f"{V1}/datasets/drive/tokyo-urban/versions/manifest"
    r = client.post(url, params={"label": "v1"}, content=body)
    assert r.status_code == 200, r.text
    reg = r.json()
    assert reg["created"] is True and reg["verified"] is False and reg["files"] == 20
    again = client.post(url, content=body).json()
    assert again["created"] is False and again["version_id"] == reg["version_id"]

    assert client.get(f"{V1}/datasets").json() == ["drive/tokyo-urban"]
    listed = client.get(f"{V1}/datasets/drive/tokyo-urban/versions").json()
    assert [v["version_id"] for v in listed] == [reg["version_id"]]
    shown = client.get(f"{V1}/versions/drive/tokyo-urban@{reg['version_id'][:8]}").json()
    assert shown["labels"] == ["latest", "v1"]

    r = client.put(f"{V1}/labels", json={"ref": "drive/tokyo-urban@v1", "label": "stable"})
    assert r.status_code == 200 and r.json()["labels"] == ["latest", "stable", "v1"]

    exported = client.get(f"{V1}/versions/drive/tokyo-urban@stable/manifest")
    assert exported.status_code == 200
    assert exported.headers["x-datasync-version-id"] == reg["version_id"]
    lines = exported.content.splitlines()
    assert lines[0] == b'{"chunk_size":67108864,"format":"datasync-manifest/1"}'
    assert len(lines) == 21
    # The export is a valid upload and reproduces the id.
    copy = client.post(f"{V1}/datasets/drive/copy/versions/manifest", content=exported.content)
    assert copy.json()["version_id"] == reg["version_id"]


def test_register_a_server_directory_and_diff(tmp_path: Path, db_url: str) -> None:
    tree = tmp_path / "site" / "out" / "tree"
    generate(tree)
    env = site_env(tmp_path, db_url)
    with bootstrap(load_settings(env=env)) as app, admin_client(app) as client:
        url = f"{V1}/datasets/drive/a/versions/directory"
        first = client.post(url, json={"path": str(tree), "chunk_size": 1 << 20}).json()
        mutate(tree)
        second = client.post(url, json={"path": str(tree), "chunk_size": 1 << 20, "label": "v2"})
        assert second.status_code == 200 and second.json()["created"] is True
        d = client.get(
            f"{V1}/diff", params={"old": f"drive/a@{first['version_id']}", "new": "drive/a@v2"}
        )
    assert d.status_code == 200
    body = d.json()
    assert [c["path"] for c in body["added"]] == [MUTATED[2]]
    assert [c["path"] for c in body["removed"]] == [MUTATED[3]]
    assert [c["path"] for c in body["changed"]] == [MUTATED[0], MUTATED[1]]


def test_the_directory_route_takes_a_site_path_like_the_cli(tmp_path: Path, db_url: str) -> None:
    """``SITE:path`` names a directory of a configured site (scanned by the same scanner);
    URLs stay refused there: an API client must not make the server fetch arbitrary URLs,
    nor read directories outside the configured sites."""
    run = tmp_path / "site" / "out" / "run1"
    generate(run)
    env = site_env(tmp_path, db_url)
    with bootstrap(load_settings(env=env)) as app, admin_client(app) as client:
        url = f"{V1}/datasets/drive/a/versions/directory"
        by_site = client.post(url, json={"path": "lustre:out/run1", "chunk_size": 1 << 20})
        assert by_site.status_code == 200, by_site.text
        by_path = app.service.register_directory("drive/a", run, chunk_size=1 << 20)
        assert not by_path.created and by_path.version_id == by_site.json()["version_id"]
        for outside in (f"file://{run}", "/etc", str(tmp_path), "rel/dir", f"{run}/../../.."):
            refused = client.post(url, json={"path": outside})
            assert refused.status_code == 400, outside
            assert "not a directory of a configured site" in refused.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("get", "/versions/drive/none@latest", {}, 404, "unknown dataset"),
        ("get", "/versions/BAD@x", {}, 400, "invalid dataset name"),
        ("get", "/datasets/drive/none/versions", {}, 404, "unknown dataset"),
        ("get", "/diff", {"params": {"old": "drive/x"}}, 422, "new"),
        ("put", "/labels", {"json": {"ref": "drive/x@y"}}, 422, "label"),
        (
            "post",
            "/datasets/drive/a/versions/directory",
            {"json": {"path": "/no/dir"}},
            400,
            "not a directory of a configured site",
        ),
        (
            "post",
            "/datasets/drive/a/versions/directory",
            {"json": {"path": "s3://b/p"}},
            400,
            "not a directory of a configured site",
        ),
        ("post", "/datasets/drive/a/versions/manifest", {"content": b"{}\n"}, 422, "line 1"),
    ],
)
def test_errors_are_json_with_the_right_status(
    client: TestClient, method: str, path: str, kwargs: dict[str, object], status: int, message: str
) -> None:
    r = getattr(client, method)(V1 + path, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get(f"{V1}/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        f"{V1}/datasets",
        f"{V1}/datasets/{{dataset}}/versions",
        f"{V1}/datasets/{{dataset}}/versions/manifest",
        f"{V1}/datasets/{{dataset}}/versions/directory",
        f"{V1}/versions/{{ref}}",
        f"{V1}/versions/{{ref}}/manifest",
        f"{V1}/diff",
        f"{V1}/labels",
    } <= paths
    assert "SERVER" in str(spec["paths"][f"{V1}/datasets/{{dataset}}/versions/directory"])


def test_datasync_serve_answers_over_http(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "DATASYNC_HOME": str(home), "DATASYNC_DATABASE_URL": ""}
    with serving(env) as server:
        assert httpx.get(f"{server.base}{V1}/health").json() == {"status": "ok"}
        auth = {"Authorization": f"Bearer {served_admin_token(home)}"}
        r = httpx.get(f"{server.base}{V1}/datasets", headers=auth, timeout=5)
        assert r.status_code == 200 and r.json() == []
        spec = httpx.get(f"{server.base}{V1}/openapi.json", timeout=5).json()
        assert spec["info"]["title"] == "datasync"
