"""Small pieces the object-store backends (s3, azure, gcs) share.

* Key layout: a backend's root is ``bucket`` plus an optional ``prefix``; user keys are
  joined below it with ``/`` and handed back relative to it, unchanged otherwise.
* ``Retry-After`` parsing (seconds or an HTTP date) for ``Throttled.retry_after``.
* ``SingleRequestWriter``: objects that fit in one part are sent with one request at
  commit. Its buffer copies the caller's bytes, because callers reuse their buffers.
* ``translated``: the body of each backend's one error-translation context manager.
* ``codepoint_order``: Azurite lists in UTF-16 order; the protocol promises code points.
* Option checking, so a typo in ``[sites.NAME] options`` fails loudly instead of silently.
* ``Timeouts``: connect short; read sized to the request, ``read_timeout + bytes /
  min_rate_bytes`` (a floor plus the bytes the call sends or receives at a minimum rate),
  so an endpoint that accepts connections and never answers fails a small request in
  seconds while a large part still gets the time it needs.
* ``network_error``: a connection or timeout error names the endpoint (``host:port``) it
  was talking to, next to the object's URL.
"""

from __future__ import annotations

import email.utils
import heapq
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from datasync.backends.base import ObjectInfo, PartLayout
from datasync.errors import ConfigError, SourceChanged, StorageError, TransientError

T = TypeVar("T")

__all__ = [
    "CONNECT_TIMEOUT",
    "MIN_RATE_BYTES",
    "READ_TIMEOUT",
    "SINGLE_PUT_PREFIX",
    "TIMEOUT_OPTIONS",
    "HasEndpoint",
    "Prepares",
    "SingleRequestWriter",
    "SmallObjectBuffer",
    "Timeouts",
    "check_options",
    "check_pin",
    "codepoint_order",
    "host_port",
    "join_key",
    "network_error",
    "new_token",
    "opt_bool",
    "opt_int",
    "opt_seconds",
    "opt_str",
    "parse_retry_after",
    "relative_key",
    "root_prefix",
    "single_writer",
    "translated",
]

# Tokens of single-request writers start with this, so ``begin(token=)`` can tell them apart.
SINGLE_PUT_PREFIX = "put:"
MiB = 1024 * 1024
TIMEOUT_OPTIONS = frozenset({"connect_timeout", "read_timeout", "min_rate_bytes"})
CONNECT_TIMEOUT = 5.0  # seconds
READ_TIMEOUT = 10.0  # seconds: the floor of every call
MIN_RATE_BYTES = 1.0 * MiB  # per second: what a call's bytes add to its read timeout


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request timeouts of an object store (seconds; options of the same names).

    ``read(nbytes)`` is the read timeout of a call that sends or receives ``nbytes``:
    ``read_timeout`` (the floor: a HEAD, a listing page, a small PUT) plus the time those
    bytes take at ``min_rate_bytes`` per second. Connecting gets ``connect_timeout``.
    """

    connect: float = CONNECT_TIMEOUT
    read_floor: float = READ_TIMEOUT
    min_rate: float = MIN_RATE_BYTES

    def read(self, nbytes: int = 0) -> float:
        return self.read_floor + max(0, nbytes) / self.min_rate

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, floor: str = "read_timeout") -> Timeouts:
        """From a site's ``connect_timeout``, ``read_timeout`` (or ``floor``) and
        ``min_rate_bytes``; positive numbers."""
        return cls(
            connect=opt_seconds(options, "connect_timeout", CONNECT_TIMEOUT),
            read_floor=opt_seconds(options, floor, READ_TIMEOUT),
            min_rate=opt_seconds(options, "min_rate_bytes", MIN_RATE_BYTES),
        )


@runtime_checkable
class Prepares(Protocol):
    """An object store whose SDK client can be built ahead of its first call."""

    def prepare(self) -> None:
        """Build the client now (SDK imports, credentials, pools); no network I/O."""
        ...


@runtime_checkable
class HasEndpoint(Protocol):
    """An object store that can say which endpoint it talks to (for health reports)."""

    @property
    def endpoint(self) -> str | None:
        """``host:port`` (None until known); no network I/O."""
        ...


def host_port(url: str | None) -> str | None:
    """``host:port`` of an endpoint URL (the scheme's default port when none is given)."""
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (80 if parts.scheme == "http" else 443)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def network_error(exc: BaseException, url: str, endpoint: str | None) -> TransientError:
    """The retryable error for a connection failure or timeout, naming the endpoint."""
    where = f" talking to {endpoint}" if endpoint else ""
    return TransientError(f"network error: {type(exc).__name__}{where}", url=url)


def root_prefix(path: str) -> str:
    """The prefix part of a URL path, without leading or trailing ``/``."""
    return path.strip("/")


def join_key(root: str, key: str) -> str:
    """The store's name for ``key`` below ``root`` (``root`` may be empty)."""
    return f"{root}/{key}" if root else key


def relative_key(root: str, name: str) -> str:
    """Inverse of ``join_key`` for names the store listed under ``root + '/'``."""
    return name[len(root) + 1 :] if root else name


def new_token() -> str:
    """A random per-attempt id: 16 lowercase hex characters, always the same length."""
    return secrets.token_hex(8)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class SmallObjectBuffer:
    """Holds part 0 of an object that fits in a single part until commit.

    Nothing is durable before commit, so ``durable_parts`` is empty: a crashed small
    upload is simply redone, which costs one request.
    """

    def __init__(self, layout: PartLayout) -> None:
        self.layout = layout
        self._data: bytes | None = b"" if layout.size == 0 else None
        self._lock = threading.Lock()

    def put(self, index: int, data: bytes | memoryview) -> None:
        self.layout.check(index, len(data))
        with self._lock:
            self._data = bytes(data)

    def take(self) -> bytes:
        with self._lock:
            if self._data is None:
                raise ValueError("commit before part 0 was written")
            return self._data


class SingleRequestWriter:
    """The writer for objects of at most one part: buffered, sent by ``send`` at commit."""

    def __init__(
        self, key: str, layout: PartLayout, token: str, send: Callable[[str, bytes], ObjectInfo]
    ) -> None:
        self._key = key
        self._token = token
        self._buffer = SmallObjectBuffer(layout)
        self._send = send

    @property
    def token(self) -> str:
        return self._token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        self._buffer.put(index, data)

    def durable_parts(self) -> set[int]:
        return set()

    def commit(self) -> ObjectInfo:
        return self._send(self._key, self._buffer.take())

    def abort(self) -> None:
        pass  # nothing was sent

    def close(self) -> None:
        """Nothing to release; the buffer goes with the writer (nothing was sent)."""


def check_pin(info: ObjectInfo, etag: str | None, url: str, *, what: str = "etag") -> ObjectInfo:
    """``info`` if it is still the version ``etag`` pinned (or nothing was pinned), else
    ``SourceChanged``. For reads the server cannot check itself (empty and past-the-end)."""
    if etag and info.etag != etag:
        raise SourceChanged(
            f"object changed since it was pinned ({what} {etag} -> {info.etag})", url=url
        )
    return info


def single_writer(
    key: str, layout: PartLayout, token: str | None, send: Callable[[str, bytes], ObjectInfo]
) -> SingleRequestWriter | None:
    """The single-request writer when ``token`` names one, or a new object fits in one part;
    None when the caller needs its chunked writer."""
    if token is None and layout.count > 1:
        return None
    if token is not None and not token.startswith(SINGLE_PUT_PREFIX):
        return None
    if layout.count > 1:
        raise ValueError(f"token {token} is for a single-part object, size is {layout.size}")
    return SingleRequestWriter(key, layout, token or SINGLE_PUT_PREFIX + new_token(), send)


@contextmanager
def translated(
    translate: Callable[[BaseException, str, str | None], StorageError | None],
    url: str,
    endpoint: Callable[[], str | None] | None = None,
) -> Iterator[None]:
    """Re-raise SDK errors as the ``StorageError`` ``translate`` maps them to (chained with
    ``from``); errors it does not know, and ``StorageError``s, pass through unchanged.
    ``endpoint()`` is asked at that moment: a client built inside the block knows it."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        mapped = translate(exc, url, endpoint() if endpoint is not None else None)
        if mapped is None:
            raise
        raise mapped from exc


def check_options(options: Mapping[str, Any], allowed: frozenset[str], url: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {url}; known: {', '.join(sorted(allowed))}"
        )


def opt_str(options: Mapping[str, Any], name: str) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"option {name} must be a string")
    return value


def opt_int(options: Mapping[str, Any], name: str, default: int, *, minimum: int = 1) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"option {name} must be an integer >= {minimum}")
    return value


def opt_seconds(options: Mapping[str, Any], name: str, default: float) -> float:
    """A positive number (int or float) option."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"option {name} must be a number > 0")
    return float(value)


def opt_bool(options: Mapping[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"option {name} must be true or false")
    return value


def codepoint_order(items: Iterator[T], key: Callable[[T], str]) -> Iterator[T]:
    """Re-emit a listing sorted by UTF-16 code units (Azurite) in code-point order.

    The two orders differ only where one key has an astral character (>= U+10000, a
    surrogate pair in UTF-16) at the position where another has U+E000..U+FFFF. A key
    whose first astral character is at position ``j`` can therefore still be followed by
    keys as small as ``key[:j] + "\\ue000"``; anything below that bound is final. A listing
    already in code-point order passes through, holding back only keys with astral
    characters until the listing moves past their prefix.
    """
    pending: list[tuple[str, int, T]] = []
    for seq, item in enumerate(items):
        name = key(item)
        heapq.heappush(pending, (name, seq, item))
        astral = next((i for i, ch in enumerate(name) if ord(ch) >= 0x10000), None)
        if astral is None:
            while pending and pending[0][0] <= name:
                yield heapq.heappop(pending)[2]
        else:
            bound = name[:astral] + "\ue000"
            while pending and pending[0][0] < bound:
                yield heapq.heappop(pending)[2]
    while pending:
        yield heapq.heappop(pending)[2]
