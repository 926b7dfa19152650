"""GCS behaviour beyond the shared contract, on gcp-storage-emulator (and a canned-error
server): composite uploads, their temporaries, and the emulator's missing preconditions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from datasync.backends.gcs import COMPOSE_FANIN, PARTS_DIR, GCSBackend
from datasync.errors import PermissionDenied, Throttled, TransientError
from tests.fixtures.emulators import ErrorServer, closed_port, make_gcs_backend

pytestmark = pytest.mark.emulator


def _names(backend: GCSBackend) -> list[str]:
    return sorted(b.name for b in backend.client.list_blobs(backend.bucket_name))


def test_compose_tree_for_more_than_32_parts(gcs_backend: GCSBackend) -> None:
    n = 2 * COMPOSE_FANIN + 7  # two levels of composition
    ps = 1000
    data = bytes(i % 251 for i in range(n * ps - 10))
    writer = gcs_backend.begin("many-parts.bin", len(data), ps)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: writer.put_part(i, data[i * ps : (i + 1) * ps]), range(n)))
    assert writer.durable_parts() == set(range(n))
    assert [i.key for i in gcs_backend.list("")] == []  # temporaries are never listed
    assert any(name.startswith(PARTS_DIR) for name in _names(gcs_backend))
    info = writer.commit()
    assert info.size == len(data)
    assert gcs_backend.read_range("many-parts.bin", 0, len(data)) == data
    assert _names(gcs_backend) == ["many-parts.bin"]  # parts and intermediates deleted


def test_resume_lists_part_objects_from_a_new_backend(
    request: pytest.FixtureRequest, gcs_backend: GCSBackend
) -> None:
    endpoint = str(request.getfixturevalue("gcs_emulator"))
    writer = gcs_backend.begin("resumed", 2500, 1000)
    writer.put_part(2, b"c" * 500)
    writer.put_part(0, b"a" * 1000)
    other = GCSBackend(gcs_backend.bucket_name, "", endpoint=endpoint, project="test")
    request.addfinalizer(other.close)
    resumed = other.begin("resumed", 2500, 1000, token=writer.token)
    assert resumed.durable_parts() == {0, 2}
    resumed.put_part(1, b"b" * 1000)
    resumed.commit()
    assert other.read_range("resumed", 0, 3000) == b"a" * 1000 + b"b" * 1000 + b"c" * 500


def test_abort_deletes_the_temporaries(gcs_backend: GCSBackend) -> None:
    writer = gcs_backend.begin("aborted", 2500, 1000)
    writer.put_part(0, b"a" * 1000)
    writer.put_part(1, b"b" * 1000)
    writer.abort()
    assert _names(gcs_backend) == []
    assert gcs_backend.begin("aborted", 2500, 1000, token=writer.token).durable_parts() == set()


def test_conditional_read_is_declared_per_endpoint(request: pytest.FixtureRequest) -> None:
    emulated = make_gcs_backend(request)
    # The emulator serves a stale generation pin: the backend must not claim enforcement.
    w = emulated.begin("k", 3, 3)
    w.put_part(0, b"old")
    old = w.commit()
    w = emulated.begin("k", 3, 3)
    w.put_part(0, b"new")
    w.commit()
    assert emulated.read_range("k", 0, 3, etag=old.etag) == b"new"  # not enforced here
    assert emulated.capabilities.conditional_read is False
    # Real GCS (no emulator endpoint) enforces if_generation_match; no I/O to ask this.
    real = GCSBackend("some-bucket", "", project="p")
    assert real.capabilities.conditional_read is True
    forced = GCSBackend("some-bucket", "", endpoint="http://x", conditional_read=True)
    assert forced.capabilities.conditional_read is True


def test_too_many_requests_is_throttled(error_server: ErrorServer) -> None:
    """Invariant 7: 429/503 are retryable ``Throttled``, 500 a ``TransientError``."""
    error_server.status = 429
    error_server.headers = {"Retry-After": "2", "Content-Type": "application/json"}
    error_server.body = b'{"error": {"code": 429, "message": "rate limit"}}'
    backend = GCSBackend("throttled", "", endpoint=error_server.url)
    with pytest.raises(Throttled) as caught:
        backend.stat("k")
    assert caught.value.retryable
    assert error_server.requests == 1  # library retries are off
    error_server.status = 503
    error_server.body = b'{"error": {"code": 503, "message": "backend error"}}'
    with pytest.raises(Throttled):
        list(backend.list(""))
    error_server.status = 500
    error_server.body = b'{"error": {"code": 500, "message": "oops"}}'
    with pytest.raises(TransientError):
        backend.read_range("k", 0, 10)
    backend.close()


def test_body_cut_short_is_transient(error_server: ErrorServer) -> None:
    """Invariant 7: a connection dropped mid-body is a retryable ``TransientError``."""
    error_server.status = 206
    error_server.body = b"x" * 10
    error_server.short_by = 90
    backend = GCSBackend("truncated", "", endpoint=error_server.url)
    with pytest.raises(TransientError):
        backend.read_range("k", 0, 100)
    backend.close()


def test_closed_port_is_transient() -> None:
    """Invariant 7: a refused connection is a retryable ``TransientError``."""
    backend = GCSBackend("nowhere", "", endpoint=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(TransientError):
        backend.stat("k")
    backend.close()


def test_rejected_service_account_is_permission_denied(request: pytest.FixtureRequest) -> None:
    """Invariant 7: rejected credentials are a permanent ``PermissionDenied``."""
    backend = make_gcs_backend(request, bad_credentials=True)
    with pytest.raises(PermissionDenied) as caught:
        list(backend.list(""))
    assert "PRIVATE KEY" not in str(caught.value)
