"""The backend protocol every storage system implements, and its declared capabilities.

Contract (pinned by ``tests/conformance``):

* Keys are ``/``-separated, relative to the backend's root (the URL's path/prefix), never
  start with ``/`` and are passed through unchanged: spaces, ``%``, ``+`` and non-ASCII
  characters are ordinary characters.
* ``stat(key)`` returns ``ObjectInfo`` or raises ``NotFound``.
* ``list(prefix)`` streams every object whose key starts with ``prefix`` (recursively),
  paginating internally, in ascending key order where the store guarantees it (all ours do).
  Nothing is buffered beyond one page.
* ``read_range(key, offset, length, etag=)`` returns exactly ``min(length, size - offset)``
  bytes. ``offset == size`` returns ``b""``. With ``etag`` set, a changed object raises
  ``SourceChanged`` where ``capabilities.conditional_read`` is true.
* ``begin(key, size, part_size, token=)`` starts a chunked write. Parts are numbered
  ``0..ceil(size/part_size)-1``, may be written in any order and from many threads; every
  part but the last is exactly ``part_size`` bytes. Nothing is visible at ``key`` before
  ``commit()``; ``commit()`` replaces any existing object atomically; ``abort()`` leaves
  nothing behind. Passing a previous writer's ``token`` resumes it: ``durable_parts()`` then
  names the parts the store already holds.
* ``delete(key)`` is idempotent: deleting a missing key is not an error.
* ``copy(src, dst)`` is a server-side copy; only called when ``capabilities.server_side_copy``.

Every method raises only ``datasync.errors.StorageError`` subclasses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Backend", "Capabilities", "ObjectInfo", "Writer"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend (or a particular endpoint of it) can do. Callers fall back when False."""

    server_side_copy: bool = False
    native_checksums: tuple[str, ...] = ()  # e.g. ("crc32c", "md5")
    atomic_rename: bool = False
    hard_links: bool = False
    conditional_read: bool = False  # read_range(etag=...) is enforced by the server
    min_part_size: int = 1
    max_part_size: int = 2**63 - 1
    max_parts: int = 2**31 - 1
    lustre_striping: bool = False


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object. ``etag`` is the version token used to pin reads (ETag,
    generation, or ``mtime_ns-ino`` on POSIX)."""

    key: str
    size: int
    etag: str | None = None
    mtime: float | None = None


@runtime_checkable
class Writer(Protocol):
    @property
    def token(self) -> str:
        """Opaque resume token (upload id, temp name, ...). Safe to store in the database."""
        ...

    def put_part(self, index: int, data: bytes | memoryview) -> None: ...

    def durable_parts(self) -> set[int]: ...

    def commit(self) -> ObjectInfo: ...

    def abort(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    @property
    def url(self) -> str:
        """The root URL, without credentials."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def read_range(
        self, key: str, offset: int, length: int, *, etag: str | None = None
    ) -> bytes: ...

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> Writer: ...

    def delete(self, key: str) -> None: ...

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo: ...

    def close(self) -> None: ...
