"""S3 behaviour beyond the shared contract, on moto's real server.

A small reverse proxy in front of moto plays an S3-compatible store that refuses checksum
headers or throttles, so the degrade path and the throttling translation see the bytes a
real endpoint would send (status, XML error body, Retry-After) through real botocore.
"""

from __future__ import annotations

import http.client
import http.server
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError

from datasync.backends import s3
from datasync.backends.s3 import S3Backend
from datasync.errors import (
    ChecksumMismatch,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    Throttled,
    TransientError,
    Unsupported,
)
from tests.fixtures.emulators import S3_KEYS, ErrorServer, make_s3_backend, unique_name

pytestmark = pytest.mark.emulator

MiB = 1024 * 1024


@dataclass
class Proxy:
    """Forwards to moto; ``mode`` is "pass", "no-checksums" or "throttle"."""

    upstream_port: int
    mode: str = "pass"
    seen_checksum_headers: list[str] = field(default_factory=list)
    url: str = ""


def _error(
    handler: http.server.BaseHTTPRequestHandler, status: int, code: str, **headers: str
) -> None:
    body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>{code} from the test proxy</Message></Error>"
    ).encode()
    handler.send_response(status)
    for name, value in {"Content-Type": "application/xml", **headers}.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def proxy(moto_server: str) -> Iterator[Proxy]:
    state = Proxy(upstream_port=int(moto_server.rsplit(":", 1)[1]))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            checksum = [h for h in self.headers if h.lower().startswith("x-amz-checksum")]
            checksum += [h for h in self.headers if h.lower() == "x-amz-sdk-checksum-algorithm"]
            if checksum:
                state.seen_checksum_headers.extend(checksum)
            if state.mode == "no-checksums" and checksum:
                return _error(self, 400, "InvalidArgument")
            if state.mode == "throttle":
                return _error(self, 503, "SlowDown", **{"Retry-After": "7"})
            conn = http.client.HTTPConnection("127.0.0.1", state.upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            # botocore drops a connection after an error reply mid-upload: not our bug, and
            # the server thread's traceback would leak into pytest's output between tests.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _proxied(request: pytest.FixtureRequest, proxy: Proxy, **options: Any) -> S3Backend:
    backend = make_s3_backend(request, **options)  # bucket created through moto directly
    routed = S3Backend(
        backend.bucket, "", endpoint_url=proxy.url, region_name="us-east-1", **S3_KEYS, **options
    )
    request.addfinalizer(routed.close)
    return routed


def _write(backend: S3Backend, key: str, data: bytes, part_size: int) -> None:
    writer = backend.begin(key, len(data), part_size)
    for i in range(-(-len(data) // part_size)):
        writer.put_part(i, data[i * part_size : (i + 1) * part_size])
    writer.commit()


def test_parts_are_sent_with_crc32c(request: pytest.FixtureRequest, proxy: Proxy) -> None:
    """moto accepts the headers but neither checks nor lists part checksums (a known gap,
    docs/backends-cloud.md), so the proxy confirms they are on the wire."""
    backend = _proxied(request, proxy)
    data = bytes(range(256)) * (44 * 1024)  # 11 MiB: three parts
    _write(backend, "crc", data, 5 * MiB)
    assert sorted(h.lower() for h in proxy.seen_checksum_headers) == (
        ["x-amz-checksum-algorithm"] + ["x-amz-checksum-crc32c"] * 3
    )
    assert backend.read_range("crc", 0, len(data)) == data
    assert backend.capabilities.native_checksums == ("crc32c",)


def test_endpoint_that_rejects_checksums_degrades_and_is_remembered(
    request: pytest.FixtureRequest, proxy: Proxy
) -> None:
    proxy.mode = "no-checksums"
    backend = _proxied(request, proxy)
    assert backend.capabilities.native_checksums == ("crc32c",)  # not yet known
    data = b"0123456789abcdef" * (700 * 1024)  # 11.2 MB, three parts
    _write(backend, "degraded.bin", data, 5 * MiB)
    _write(backend, "small.bin", b"tiny", 5 * MiB)  # PutObject path
    assert backend.read_range("degraded.bin", 0, len(data)) == data
    assert backend.read_range("small.bin", 0, 10) == b"tiny"
    assert proxy.seen_checksum_headers, "the first attempt did send a checksum"
    # Learned once per endpoint: a new backend on it sends none from the start.
    proxy.seen_checksum_headers.clear()
    again = _proxied(request, proxy)
    assert again.capabilities.native_checksums == ()
    _write(again, "later.bin", data, 5 * MiB)
    assert proxy.seen_checksum_headers == []


def test_checksum_required_on_such_endpoint_is_unsupported(
    request: pytest.FixtureRequest, proxy: Proxy
) -> None:
    proxy.mode = "no-checksums"
    backend = _proxied(request, proxy, checksum="crc32c")
    with pytest.raises(Unsupported, match="checksum"):
        backend.begin("x", 11 * MiB, 5 * MiB)


def test_slowdown_is_throttled_with_retry_after(
    request: pytest.FixtureRequest, proxy: Proxy
) -> None:
    """Invariant 7: SlowDown is a retryable ``Throttled`` carrying Retry-After."""
    backend = _proxied(request, proxy)
    proxy.mode = "throttle"
    with pytest.raises(Throttled) as caught:
        backend.stat("anything")
    assert caught.value.retryable
    assert caught.value.retry_after == 7.0
    with pytest.raises(Throttled):
        list(backend.list(""))


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, Throttled),
        ("RequestLimitExceeded", 400, Throttled),
        ("InternalError", 500, TransientError),
        ("AccessDenied", 403, PermissionDenied),
        ("SignatureDoesNotMatch", 403, PermissionDenied),
        ("PreconditionFailed", 412, SourceChanged),
        ("BadDigest", 400, ChecksumMismatch),
    ],
)
def test_error_codes_translate(code: str, status: int, expected: type) -> None:
    """Invariant 7: each S3 error code maps to a retryable or permanent class."""
    error = ClientError(
        {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
        },
        "GetObject",
    )
    assert type(s3.translate(error, "s3://b/k")) is expected


def test_short_body_translates_to_transient() -> None:
    """Invariant 7: a body shorter than its Content-Length is retryable, not permanent."""
    from botocore.exceptions import IncompleteReadError

    error = IncompleteReadError(actual_bytes=10, expected_bytes=100)
    assert type(s3.translate(error, "s3://b/k")) is TransientError


def _on(server: ErrorServer) -> S3Backend:
    return S3Backend("cut", endpoint_url=server.url, region_name="us-east-1", **S3_KEYS)


def test_a_ranged_body_cut_short_is_transient(error_server: ErrorServer) -> None:
    """Invariant 7: a ranged read whose body stops before its Content-Length is a
    retryable ``TransientError``, not a short read (bodies are read by ``httpbody``)."""
    error_server.status = 206
    error_server.headers = {"Content-Range": "bytes 0-99/100", "ETag": '"e"'}
    error_server.body = b"x" * 10
    error_server.short_by = 90
    backend = _on(error_server)
    with pytest.raises(TransientError):
        backend.read_range("k", 0, 100)
    backend.close()


def test_a_range_the_endpoint_ignored_is_never_read_past(error_server: ErrorServer) -> None:
    """A whole object answered for a range is an error, not bytes from the wrong offset."""
    error_server.status = 200
    error_server.body = b"x" * 100
    backend = _on(error_server)
    with pytest.raises(StorageError, match="asked for 10 bytes, got 100"):
        backend.read_range("k", 50, 10)
    backend.close()


def test_closed_port_is_transient() -> None:
    """Invariant 7: a refused connection is a retryable ``TransientError``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends
    backend = S3Backend(
        unique_name(),
        "",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        connect_timeout=2,
        **S3_KEYS,
    )
    with pytest.raises(TransientError) as caught:
        backend.stat("k")
    assert caught.value.retryable
    backend.close()


def test_bad_credentials_never_appear_in_errors(request: pytest.FixtureRequest) -> None:
    backend = make_s3_backend(request, bad_credentials=True)
    with pytest.raises(PermissionDenied) as caught:
        backend.stat("k")
    text = str(caught.value)
    assert "wrong" not in text and "AKIAWRONG" not in text
    assert backend.bucket in text


def test_pinned_read_after_overwrite_is_source_changed(s3_backend: S3Backend) -> None:
    _write(s3_backend, "pinned", b"first", 5 * MiB)
    etag = s3_backend.stat("pinned").etag
    _write(s3_backend, "pinned", b"second", 5 * MiB)
    with pytest.raises(SourceChanged):
        s3_backend.read_range("pinned", 0, 3, etag=etag)
    with pytest.raises(SourceChanged):
        s3_backend.read_range("pinned", 6, 3, etag=etag)  # past the end: checked by HEAD


def test_large_copy_uses_upload_part_copy(request: pytest.FixtureRequest) -> None:
    backend = make_s3_backend(request, multipart_copy_threshold=6 * MiB, copy_part_size=5 * MiB)
    data = bytes(range(251)) * (48 * 1024)  # 11.8 MiB
    _write(backend, "src", data, 5 * MiB)
    info = backend.copy("src", "dst")
    assert info.etag and info.etag.endswith("-3")  # a multipart object: three copied parts
    assert backend.read_range("dst", 0, len(data)) == data


def test_resume_from_a_new_process_reads_checksum_mode(request: pytest.FixtureRequest) -> None:
    first = make_s3_backend(request)
    data = b"r" * (11 * MiB)
    writer = first.begin("resume", len(data), 5 * MiB)
    writer.put_part(1, data[5 * MiB : 10 * MiB])
    # A new backend object (as after a restart) picks the upload up by its token.
    second = S3Backend(
        first.bucket, "", endpoint_url=first.endpoint_url, region_name="us-east-1", **S3_KEYS
    )
    request.addfinalizer(second.close)
    resumed = second.begin("resume", len(data), 5 * MiB, token=writer.token)
    assert resumed.durable_parts() == {1}
    resumed.put_part(0, data[: 5 * MiB])
    resumed.put_part(2, data[10 * MiB :])
    resumed.commit()
    assert second.read_range("resume", 0, len(data)) == data


def test_a_commit_repeated_after_a_lost_answer_is_recognised(s3_backend: S3Backend) -> None:
    """CompleteMultipartUpload took effect but its answer was lost: the retry finds the
    upload gone (NoSuchUpload) and accepts the object only because its ETag is the
    multipart ETag of the parts this writer sent."""
    data = b"c" * (11 * MiB)
    writer = s3_backend.begin("lost-answer", len(data), 5 * MiB)
    for i, offset in enumerate(range(0, len(data), 5 * MiB)):
        writer.put_part(i, data[offset : offset + 5 * MiB])
    first = writer.commit()
    assert first.etag and first.etag.endswith("-3")
    again = writer.commit()
    assert (again.etag, again.size) == (first.etag, len(data))
    # Someone else's object at the key is not taken for ours.
    _write(s3_backend, "lost-answer", b"other bytes", 5 * MiB)
    with pytest.raises(NotFound):
        writer.commit()
    # An upload that never completed (aborted) is not committed either.
    aborted = s3_backend.begin("never", len(data), 5 * MiB)
    aborted.put_part(0, data[: 5 * MiB])
    aborted.abort()
    with pytest.raises(NotFound):
        aborted.commit()
