"""A loopback HTTP proxy that injects faults between datasync and a storage emulator.

Sites point their endpoint at the proxy (S3 ``endpoint_url``, Azure ``BlobEndpoint``, GCS
``endpoint``); every request is forwarded to the real emulator unchanged (the ``Host``
header too, so request signatures stay valid) unless the current ``Fault`` hits it:

* ``storm``: answered by the proxy itself with the store's own throttling answer (S3
  ``503 SlowDown``, Azure ``503 ServerBusy``, GCS ``429 rateLimitExceeded``), always with
  ``Retry-After``; the emulator never sees the request;
* ``reset``: the connection is reset (TCP RST): on odd injections before the request is
  forwarded, on even ones after the emulator answered (the write took effect, its answer
  was lost: commits must be safe to repeat);
* ``truncate``: the response's headers promise the whole body, half of it is sent, then
  the connection is reset;
* ``flip``: one bit of an object's bytes in a read's response body is flipped, the length
  and headers kept (a corrupting middlebox or NIC); only object data (``GET`` answered
  2xx with a non-XML/JSON body) is touched, never listings;
* ``latency``: the request is held for ``delay`` seconds before it is forwarded.

A fault hits every ``every``-th eligible request (counted from the first), at most
``limit`` times, and with ``only`` set only requests whose path contains it (one bucket).
A flip never hits the same request twice (bits flipped in flight are rare; a source that
is wrong every time is another fault: ``test_source_faults.py``). ``FaultProxy.stats``
counts requests, injections, and retries observed: the first repeat (method, path and
query, range) of a request that a storm, reset, truncation or flip hit. The proxy
rewrites ``Location`` headers (GCS resumable sessions), so clients keep talking to it.

Standard library only; one thread per connection.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["KINDS", "Fault", "FaultProxy", "ProxyStats"]

Kind = Literal["storm", "reset", "truncate", "flip", "latency"]
Store = Literal["s3", "azure", "gcs"]
KINDS: tuple[Kind, ...] = ("storm", "reset", "truncate", "flip", "latency")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_MIN_BODY = 64  # truncate/flip only bodies this long (object data, not tiny answers)


@dataclass(frozen=True)
class Fault:
    kind: Kind
    every: int = 3
    limit: int | None = None
    retry_after: float = 1.0  # storms: the Retry-After header (seconds)
    delay: float = 0.2  # latency: seconds held
    only: str | None = None  # only requests whose path contains this (a bucket name)


@dataclass
class ProxyStats:
    requests: int = 0
    eligible: int = 0
    injected: int = 0
    retried: int = 0  # requests repeating one the proxy hit earlier
    by_method: Counter[str] = field(default_factory=Counter)


def _throttle_answer(store: Store, retry_after: float) -> tuple[int, dict[str, str], bytes]:
    after = str(max(0, round(retry_after)))
    if store == "s3":
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        return 503, {"Content-Type": "application/xml", "Retry-After": after}, body
    if store == "azure":
        body = (
            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
            b"<Message>The server is busy.</Message></Error>"
        )
        headers = {
            "Content-Type": "application/xml",
            "Retry-After": after,
            "x-ms-error-code": "ServerBusy",
        }
        return 503, headers, body
    doc = {
        "error": {
            "code": 429,
            "message": "The rate of change requests to the bucket is too high.",
            "errors": [{"reason": "rateLimitExceeded", "message": "rate limit exceeded"}],
        }
    }
    return 429, {"Content-Type": "application/json", "Retry-After": after}, json.dumps(doc).encode()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``http://host:port``), injecting the
    current ``fault`` (None: a transparent proxy). Start with ``start()``, end with
    ``stop()``; change the fault at any time with ``set_fault``."""

    def __init__(self, upstream: str, store: Store, *, seed: int = 1) -> None:
        host_port = upstream.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.partition(":")
        self.upstream_host = host
        self.upstream_port = int(port or 80)
        self.store = store
        self.stats = ProxyStats()
        self._fault: Fault | None = None
        self._lock = threading.Lock()
        self._hit: set[tuple[str, str, str]] = set()
        self._flipped: set[tuple[str, str, str]] = set()
        self._rng = random.Random(seed)
        self._server = self._make_server()
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_fault(self, fault: Fault | None) -> None:
        with self._lock:
            self._fault = fault
            self.stats.eligible = 0

    # -- decisions (under the lock) ----------------------------------------------------------

    def _note(self, method: str, signature: tuple[str, str, str]) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.by_method[method] += 1
            if signature in self._hit:
                self._hit.discard(signature)
                self.stats.retried += 1

    def _decide(self, kind: Kind, signature: tuple[str, str, str]) -> tuple[Fault, int] | None:
        """The fault to inject into this eligible request, if it is its turn, and which
        injection (1-based) it is."""
        with self._lock:
            fault = self._fault
            if fault is None or fault.kind != kind:
                return None
            if fault.only is not None and fault.only not in signature[1]:
                return None
            if fault.limit is not None and self.stats.injected >= fault.limit:
                return None
            if kind == "flip" and signature in self._flipped:
                return None
            self.stats.eligible += 1
            if (self.stats.eligible - 1) % fault.every:
                return None
            self.stats.injected += 1
            if kind != "latency":  # a slow answer is still an answer: nothing to retry
                self._hit.add(signature)
            if kind == "flip":
                self._flipped.add(signature)
            return fault, self.stats.injected

    def _flip_position(self, size: int) -> tuple[int, int]:
        with self._lock:
            return self._rng.randrange(size), 1 << self._rng.randrange(8)

    # -- the server --------------------------------------------------------------------------

    def _make_server(self) -> http.server.ThreadingHTTPServer:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                with contextlib.suppress(OSError):
                    self.connection.close()

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=120
                )
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP and name.lower() != "content-length":
                            conn.putheader(name, value)
                    if body or self.command in ("PUT", "POST", "PATCH"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), data
                finally:
                    conn.close()

            def _answer(
                self,
                status: int,
                reason: str,
                headers: list[tuple[str, str]],
                body: bytes,
                *,
                declared: int | None = None,
            ) -> None:
                self.send_response_only(status, reason)
                length_sent = False
                for name, value in headers:
                    low = name.lower()
                    if low in _HOP or low in ("date", "server"):
                        continue
                    if low == "content-length":
                        if self.command == "HEAD":
                            self.send_header(name, value)
                            length_sent = True
                        continue
                    if low == "location":
                        upstream = f"{proxy.upstream_host}:{proxy.upstream_port}"
                        value = value.replace(upstream, f"127.0.0.1:{proxy.port}")
                    self.send_header(name, value)
                if not length_sent:
                    self.send_header(
                        "Content-Length", str(len(body) if declared is None else declared)
                    )
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                signature = (self.command, self.path, self.headers.get("Range", ""))
                proxy._note(self.command, signature)
                latency = proxy._decide("latency", signature)
                if latency is not None:
                    time.sleep(latency[0].delay)
                storm = proxy._decide("storm", signature)
                if storm is not None:
                    code, throttle_headers, answer = _throttle_answer(
                        proxy.store, storm[0].retry_after
                    )
                    self._answer(code, "Throttled", list(throttle_headers.items()), answer)
                    return
                reset = proxy._decide("reset", signature)
                if reset is not None and reset[1] % 2 == 1:
                    self._reset()
                    return
                try:
                    status, reason, headers, data = self._forward(body)
                except OSError:
                    self._reset()
                    return
                if reset is not None:
                    self._reset()  # the emulator acted on it; the answer is lost
                    return
                kind = dict((k.lower(), v) for k, v in headers).get("content-type", "")
                is_data = (
                    self.command == "GET"
                    and 200 <= status < 300
                    and len(data) >= _MIN_BODY
                    and "xml" not in kind
                    and "json" not in kind
                )
                if is_data and proxy._decide("truncate", signature) is not None:
                    half = data[: len(data) // 2]
                    self._answer(status, reason, headers, half, declared=len(data))
                    self._reset()
                    return
                if is_data and proxy._decide("flip", signature) is not None:
                    at, bit = proxy._flip_position(len(data))
                    flipped = bytearray(data)
                    flipped[at] ^= bit
                    data = bytes(flipped)
                self._answer(status, reason, headers, data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server
