"""Request-size limits (413 with a JSON error, nothing changed), and a producer manifest of
a million entries registered through a real ``datasync serve`` while its memory stays
bounded: the upload is streamed to a spool file and read line by line, never held whole."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from datasync.api import API_PREFIX, create_app
from datasync.api.limits import BodyLimits
from datasync.bootstrap import App, bootstrap
from datasync.config import load_settings
from datasync.manifest.bulk import SQLITE_BULK_CACHE_KIB
from tests.integration.api_helpers import bearer, served_admin_token, serving
from tests.integration.manifest_helpers import counts, entries, write_producer

V1 = API_PREFIX
MANIFEST = f"{V1}/datasets/drive/a/versions/manifest"
KIB = 1024


@pytest.fixture
def application(tmp_path: Path, db_url: str) -> Iterator[App]:
    env = {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": db_url}
    with bootstrap(load_settings(env=env)) as app:
        yield app


@pytest.fixture
def client(application: App) -> Iterator[TestClient]:
    limits = BodyLimits(json_bytes=4 * KIB, upload_bytes=64 * KIB)
    with TestClient(create_app(application, limits), headers=bearer(application)) as c:
        yield c


def _manifest(tmp_path: Path, n: int) -> bytes:
    rows = [{"path": e.path, "size": e.size, "digest": e.digest} for e in entries(n)]
    return write_producer(tmp_path / "m.jsonl", rows).read_bytes()


def _chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    # An iterator body goes out chunked: no Content-Length to refuse it by.
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_json_bodies_over_the_limit_are_413(client: TestClient, application: App) -> None:
    label = {"ref": "drive/a@latest", "label": "x" * 5000}
    declared = client.put(f"{V1}/labels", json=label)
    assert declared.status_code == 413, declared.text
    assert declared.json() == {"error": "request body is larger than this route's limit of 4.0 KiB"}
    streamed = client.put(
        f"{V1}/labels",
        content=_chunks(b'{"ref": "drive/a@latest", "label": "' + b"x" * 5000 + b'"}'),
        headers={"Content-Type": "application/json"},
    )
    assert streamed.status_code == 413 and "4.0 KiB" in streamed.json()["error"]
    # Refused before the token is even looked at: no database work for an oversized body.
    anonymous = client.put(f"{V1}/labels", json=label, headers={"Authorization": ""})
    assert anonymous.status_code == 413
    under = client.put(f"{V1}/labels", json={"ref": "drive/a@latest", "label": "x"})
    assert under.status_code == 404  # within the limit: on to the route (no such dataset)


def test_manifest_uploads_have_their_own_larger_limit(
    client: TestClient, application: App, tmp_path: Path
) -> None:
    url = application.settings.database_url
    small = _manifest(tmp_path, 200)  # ~19 KiB: over the JSON limit, under the upload one
    assert 4 * KIB < len(small) < 64 * KIB
    ok = client.post(MANIFEST, content=small)
    assert ok.status_code == 200 and ok.json()["files"] == 200
    before = counts(url)
    big = _manifest(tmp_path, 1000)  # ~95 KiB
    for body in (big, _chunks(big, 8 * KIB)):
        r = client.post(MANIFEST, params={"label": "v2"}, content=body)
        assert r.status_code == 413 and "64.0 KiB" in r.json()["error"], r.text
    assert counts(url) == before
    assert list((application.settings.home / "tmp").iterdir()) == []  # spool removed


def _memory_mib(pid: int) -> dict[str, int]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) memory of ``pid``, in MiB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) // 1024
    return found


def _shuffled_manifest(n: int) -> Iterator[bytes]:
    """``n`` entries in a scrambled order (a producer's order is arbitrary), made as they
    are sent: entry ``i`` is file ``i`` of size ``i``."""
    step = 7919
    while math.gcd(step, n) != 1:
        step += 2
    yield b'{"format":"datasync-producer/1"}\n'
    lines = []
    for k in range(n):
        i = (k * step) % n
        lines.append(
            b'{"path":"cam%d/%07d.jpg","size":%d,"digest":"xxh3-128:%032x"}\n' % (i % 8, i, i, i)
        )
        if len(lines) == 10_000:
            yield b"".join(lines)
            lines = []
    yield b"".join(lines)


@pytest.mark.slow
def test_a_million_entry_manifest_is_streamed_not_loaded(tmp_path: Path, db_url: str) -> None:
    n = 1_000_000  # ~95 MB of JSON Lines; as Python objects it would be well over 500 MiB
    home = tmp_path / "home"
    env = {**os.environ, "DATASYNC_HOME": str(home), "DATASYNC_DATABASE_URL": db_url}
    with serving(env, "--max-upload", "1GiB") as server:
        auth = {"Authorization": f"Bearer {served_admin_token(home)}"}
        before = _memory_mib(server.pid)
        started = time.monotonic()
        r = httpx.post(
            f"{server.base}{V1}/datasets/drive/big/versions/manifest",
            content=_shuffled_manifest(n),
            headers=auth,
            timeout=600,
        )
        seconds = time.monotonic() - started
        after = _memory_mib(server.pid)
    assert r.status_code == 200, r.text
    assert r.json()["files"] == n and r.json()["bytes"] == n * (n - 1) // 2
    growth = after["VmHWM"] - before["VmRSS"]
    # SQLite gets a page cache of a fixed size for bulk loads (``manifest/bulk.py``), the
    # same for any manifest size; PostgreSQL's memory is in its own processes.
    cache = SQLITE_BULK_CACHE_KIB // 1024 if db_url.startswith("sqlite") else 0
    print(f"{n} entries in {seconds:.0f}s: peak growth {growth} MiB (cache allowance {cache})")
    assert growth < cache + 64, f"server peak memory grew by {growth} MiB"
    assert list((home / "tmp").iterdir()) == []  # the spool file is gone
