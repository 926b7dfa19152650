"""Azure behaviour beyond the shared contract, on Azurite (and a canned-error server)."""

from __future__ import annotations

import base64

import pytest

from datasync.backends.azure import AzureBackend, block_id
from datasync.errors import NotFound, PermissionDenied, SourceChanged, Throttled, TransientError
from tests.fixtures.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    AzuriteInfo,
    ErrorServer,
    closed_port,
    make_azure_backend,
)

pytestmark = pytest.mark.emulator

KiB = 1024


def _twin(backend: AzureBackend, info: AzuriteInfo) -> AzureBackend:
    """Another backend object on the same container, as a restarted worker would have."""
    return AzureBackend(
        AZURITE_ACCOUNT, backend.container, "", connection_string=info.connection_string()
    )


def test_block_ids_are_fixed_length_and_deterministic() -> None:
    ids = [block_id("0123456789abcdef", i) for i in (0, 7, 49_999)]
    assert len({len(i) for i in ids}) == 1
    assert block_id("0123456789abcdef", 7) == ids[1]
    assert len(base64.b64encode(ids[0].encode())) <= 64  # Azure's limit on encoded ids


def test_attempts_never_collide_and_resume_reads_uncommitted_blocks(
    request: pytest.FixtureRequest, azure_backend: AzureBackend
) -> None:
    size, ps = 3 * 4 * KiB + 5, 4 * KiB
    old = azure_backend.begin("obj", size, ps)
    old.put_part(0, b"o" * ps)
    old.put_part(1, b"o" * ps)  # a dead attempt's blocks stay staged
    new = azure_backend.begin("obj", size, ps)
    assert new.token != old.token
    new.put_part(1, b"n" * ps)
    assert new.durable_parts() == {1}  # the other attempt's blocks are not ours
    resumed = _twin(azure_backend, request.getfixturevalue("azurite")).begin(
        "obj", size, ps, token=new.token
    )
    assert resumed.durable_parts() == {1}
    resumed.put_part(0, b"n" * ps)
    resumed.put_part(2, b"n" * ps)
    resumed.put_part(3, b"n" * 5)
    resumed.commit()
    assert azure_backend.read_range("obj", 0, size + 1) == b"n" * size
    blob = azure_backend.container_client.get_blob_client("obj")
    committed, _ = blob.get_block_list("all")
    assert [b.id for b in committed] == [block_id(new.token, i) for i in range(4)]


def test_aborted_token_cannot_be_resumed(azure_backend: AzureBackend) -> None:
    writer = azure_backend.begin("gone", 9 * KiB, 4 * KiB)
    writer.put_part(0, b"x" * 4 * KiB)
    writer.abort()
    with pytest.raises(NotFound, match="aborted"):
        azure_backend.begin("gone", 9 * KiB, 4 * KiB, token=writer.token)
    with pytest.raises(NotFound):
        azure_backend.stat("gone")


def test_listing_is_in_code_point_order_although_azurite_uses_utf16(
    azure_backend: AzureBackend,
) -> None:
    names = ["o/\U0001f600", "o/\uff01", "o/z", "o/\ue000x"]
    for name in names:
        w = azure_backend.begin(name, 1, 1)
        w.put_part(0, b"1")
        w.commit()
    raw = [b.name for b in azure_backend.container_client.list_blobs(name_starts_with="o/")]
    assert raw != sorted(names)  # the emulator's own order differs...
    assert [i.key for i in azure_backend.list("o/")] == sorted(names)  # ...ours does not


def test_md5_option_sends_checked_block_digests(request: pytest.FixtureRequest) -> None:
    backend = make_azure_backend(request, checksum="md5")
    assert backend.capabilities.native_checksums == ("md5",)
    data = bytes(range(256)) * 40
    writer = backend.begin("md5", len(data), 4 * KiB)
    for i in range(3):
        writer.put_part(i, data[i * 4 * KiB : (i + 1) * 4 * KiB])
    writer.commit()
    assert backend.read_range("md5", 100, 1000) == data[100:1100]


def test_copy_is_pinned_and_independent(azure_backend: AzureBackend) -> None:
    w = azure_backend.begin("src", 3, 3)
    w.put_part(0, b"abc")
    w.commit()
    info = azure_backend.copy("src", "dst")
    assert info.size == 3
    etag = azure_backend.stat("dst").etag
    w = azure_backend.begin("dst", 3, 3)
    w.put_part(0, b"xyz")
    w.commit()
    with pytest.raises(SourceChanged):
        azure_backend.read_range("dst", 0, 3, etag=etag)


def test_server_busy_is_throttled_with_retry_after(error_server: ErrorServer) -> None:
    """Invariant 7: ServerBusy is a retryable ``Throttled`` carrying Retry-After."""
    error_server.status = 503
    error_server.headers = {"x-ms-error-code": "ServerBusy", "Retry-After": "3"}
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={error_server.url}/{AZURITE_ACCOUNT};"
    )
    backend = AzureBackend(AZURITE_ACCOUNT, "throttled", "", connection_string=conn)
    with pytest.raises(Throttled) as caught:
        backend.stat("k")
    assert caught.value.retry_after == 3.0
    assert error_server.requests == 1  # the SDK's own retries are off
    error_server.status, error_server.headers = 500, {"x-ms-error-code": "InternalError"}
    with pytest.raises(TransientError):
        list(backend.list(""))
    backend.close()


def test_closed_port_is_transient() -> None:
    """Invariant 7: a refused connection is a retryable ``TransientError``."""
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{closed_port()}/{AZURITE_ACCOUNT};"
    )
    backend = AzureBackend(AZURITE_ACCOUNT, "nowhere", "", connection_string=conn)
    with pytest.raises(TransientError):
        backend.stat("k")
    backend.close()


def test_bad_key_never_appears_in_errors(request: pytest.FixtureRequest) -> None:
    backend = make_azure_backend(request, bad_credentials=True)
    with pytest.raises(PermissionDenied) as caught:
        backend.stat("k")
    assert "d3Jvbmd3" not in str(caught.value) and AZURITE_KEY not in str(caught.value)


def test_body_cut_short_is_transient(error_server: ErrorServer) -> None:
    """Invariant 7: a ranged read whose body stops before its Content-Length is a
    retryable ``TransientError``, not a short read (bodies are read by ``httpbody``)."""
    error_server.status = 206
    error_server.headers = {"Content-Range": "bytes 0-99/100", "ETag": '"0x1"'}
    error_server.body = b"x" * 10
    error_server.short_by = 90
    backend = AzureBackend("devstoreaccount1", "cut", account_url=error_server.url, anonymous=True)
    with pytest.raises(TransientError):
        backend.read_range("k", 0, 100)
    backend.close()
