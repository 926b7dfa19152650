"""The backend protocol every storage system implements, and its declared capabilities.

Contract (pinned by ``tests/conformance``):

* Keys are ``/``-separated, relative to the backend's root (the URL's path/prefix), never
  start with ``/`` and are passed through unchanged: spaces, ``%``, ``+`` and non-ASCII
  characters are ordinary characters. Empty keys, ``.``/``..`` segments, empty segments,
  backslashes and control characters are rejected with ``InvalidPath`` (``check_key``), so
  no key can escape the root on any backend.
* ``stat(key)`` returns ``ObjectInfo`` or raises ``NotFound``.
* ``list(prefix)`` streams every object whose key starts with ``prefix`` (plain string
  prefix, recursively), paginating internally, in ascending key order (code-point order,
  which equals UTF-8 byte order). Nothing is buffered beyond one page. A missing root
  (bucket, container, POSIX root directory) raises ``NotFound``; it is never "empty".
* ``read_range(key, offset, length, etag=)`` returns exactly ``min(length, size - offset)``
  bytes. ``offset == size`` (including any read of a zero-byte object) returns ``b""``.
  With ``etag`` set, a changed object raises ``SourceChanged`` where
  ``capabilities.conditional_read`` is true. ``read_range_into`` (below) is the optional
  zero-copy variant; call the free function, which falls back to ``read_range``.
* ``begin(key, size, part_size, token=)`` starts a chunked write. Parts are numbered
  ``0..ceil(size/part_size)-1`` (a zero-byte object has no parts), may be written in any
  order and from many threads; every part but the last is exactly ``part_size`` bytes
  (``PartLayout`` checks this; violations are caller bugs and raise ``ValueError``).
  Nothing is visible at ``key`` before ``commit()``; ``commit()`` replaces any existing
  object atomically and returns what ``stat`` would; ``abort()`` leaves nothing behind and
  may be called twice; ``close()`` releases local resources (a POSIX descriptor) without
  committing or aborting, so another writer can resume the token (a no-op for cloud
  writers). ``commit()`` may be called again after it raised a retryable error: a commit
  that took effect although its answer was lost returns the committed object where the
  backend can tell (S3 compares the multipart ETag, POSIX the inode), else ``NotFound``.
* Passing a previous writer's ``token`` resumes it. When ``capabilities.lists_parts`` is
  true, ``durable_parts()`` names the parts the store already holds and the caller rewrites
  the rest. When false (POSIX), ``durable_parts()`` is empty, the caller's own record of
  written parts is authoritative, and resuming an upload that no longer exists (aborted,
  committed, reaped) raises ``NotFound`` rather than silently starting over.
* ``delete(key)`` is idempotent: deleting a missing key is not an error.
* ``copy(src, dst)`` is a server-side copy producing an independent object; a backend
  without ``capabilities.server_side_copy`` raises ``Unsupported``. ``source=`` (the
  ``ObjectInfo`` the caller recorded for ``src``) pins the copy to that version without a
  stat: ``SourceChanged`` when ``src`` is another version now. The returned
  ``ObjectInfo`` describes the new object (its size and version token).
* Optional extras, each declared by a capability flag: ``rename`` (``atomic_rename``),
  ``link`` (``hard_links``), ``group_commit()`` (``group_commit``) and the local-tree
  operations views are built with (``local_tree``); see ``SupportsRename``,
  ``SupportsLink``, ``SupportsGroupCommit``, ``SupportsLocalTree``, and ``put_small``
  (``small_puts``, ``SupportsPutSmall``). Callers test the flag
  (``backend.capabilities.local_tree``); ``isinstance`` against the protocol agrees with it
  on every backend and on ``RetryingBackend``.

Verified writes (``capabilities.verified_writes``): ``commit()`` returns
``ObjectInfo(verified=True)`` only when the store itself, from checksums it computed over
the bytes it received, showed that the committed object is exactly the bytes given to
``put_part`` (every part, in order), by this writer or, with their proofs
(``SupportsPartProofs``), by earlier writers of the same upload: S3 a part ETag equal to
the part's MD5 or its CRC32C echoed (and the object's ETag or composite CRC32C over those
parts); Azure every block and Put Blob sent with Content-MD5, which the service checks;
GCS the server's CRC32C of each part and of the composed object equal to ours. Anything
less (a part another writer sent with no proof handed on, an ETag that is not an MD5, an
endpoint that echoes nothing) is ``verified=False`` and never an error, so the caller
re-reads the object. ``docs/design.md`` (invariant 2) says why this proves what a re-read
proves.

Every method raises only ``datasync.errors.StorageError`` subclasses, plus ``InvalidPath``
for bad keys and ``ValueError`` for caller bugs (bad part index or length). Error messages
carry the object's URL, never credentials.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from datasync.errors import InvalidPath

__all__ = [
    "Backend",
    "Capabilities",
    "GroupCommit",
    "ObjectInfo",
    "PartLayout",
    "SmallPut",
    "SupportsGroupCommit",
    "SupportsLink",
    "SupportsLocalTree",
    "SupportsPartProofs",
    "SupportsPutSmall",
    "SupportsReadInto",
    "SupportsRename",
    "Writer",
    "check_key",
    "join_url",
    "read_range_into",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend (or a particular endpoint of it) can do. Callers fall back when False."""

    server_side_copy: bool = False
    native_checksums: tuple[str, ...] = ()  # e.g. ("crc32c", "md5")
    atomic_rename: bool = False  # has rename(src_key, dst_key)
    hard_links: bool = False  # has link(src_key, dst_key)
    conditional_read: bool = False  # read_range(etag=...) is enforced by the server
    lists_parts: bool = False  # durable_parts() reports what the store holds
    min_part_size: int = 1
    max_part_size: int = 2**63 - 1
    max_parts: int = 2**31 - 1
    lustre_striping: bool = False
    group_commit: bool = False  # has group_commit() (SupportsGroupCommit)
    local_tree: bool = False  # keys are files under a local directory (SupportsLocalTree)
    # Writes carry checksums the store checks (S3 Content-MD5/CRC32C, Azure Content-MD5,
    # GCS CRC32C), so a commit can return ObjectInfo.verified (see "Verified writes").
    verified_writes: bool = False
    small_puts: bool = False  # has put_small(items) (SupportsPutSmall)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object. ``etag`` is the version token used to pin reads (ETag,
    generation, or ``mtime_ns-ino-size`` on POSIX). ``verified`` is set only by
    ``Writer.commit()``: see "Verified writes" in the module docstring; it takes no part
    in equality (a committed object equals what ``stat`` says)."""

    key: str
    size: int
    etag: str | None = None
    mtime: float | None = None
    verified: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class PartLayout:
    """How an object of ``size`` bytes splits into parts of ``part_size``."""

    size: int
    part_size: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.part_size < 1:
            raise ValueError(f"bad layout: size={self.size} part_size={self.part_size}")

    @property
    def count(self) -> int:
        return -(-self.size // self.part_size)

    def offset(self, index: int) -> int:
        return index * self.part_size

    def length(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise ValueError(f"part {index} out of range 0..{self.count - 1}")
        return min(self.part_size, self.size - index * self.part_size)

    def check(self, index: int, nbytes: int) -> None:
        """Raise ``ValueError`` unless part ``index`` may hold exactly ``nbytes``."""
        expected = self.length(index)
        if nbytes != expected:
            raise ValueError(f"part {index} must be {expected} bytes, got {nbytes}")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``InvalidPath``.

    Object stores would accept ``a/../b``; we refuse it everywhere because keys become
    POSIX paths in views and must never climb out of the root.
    """
    if not isinstance(key, str) or not key:
        raise InvalidPath(f"empty object key {key!r}")
    if key.startswith("/") or "\\" in key:
        raise InvalidPath(f"object key {key!r} must be relative and use '/' separators")
    if not (key.isascii() and key.isprintable()) and any(
        unicodedata.category(ch) == "Cc" for ch in key
    ):
        raise InvalidPath(f"object key {key!r} contains control characters")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidPath(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def join_url(root: str, key: str) -> str:
    """The URL of ``key`` under ``root`` (for error messages; roots hold no credentials)."""
    return f"{root.rstrip('/')}/{key}" if key else root


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

    def close(self) -> None:
        """Release local resources without commit or abort (idempotent)."""
        ...


@runtime_checkable
class SupportsPartProofs(Protocol):
    """A writer whose parts' proofs outlive it: what the store showed for each part it
    sent ("Verified writes") can be recorded and handed to a later writer of the same
    upload (same ``token``), whose commit is then ``verified`` though it did not send
    every part itself. Where a proof names the part's bytes (S3: MD5, CRC32C; GCS:
    CRC32C) the commit checks the composed object against the proofs of all its parts (MD5
    of MD5s, combined CRC32C); an Azure proof names a send the service checked (its block
    list carries no checksums). Every part needs a proof, or the commit is not verified."""

    def part_proof(self, index: int) -> str | None:
        """What the store showed for part ``index`` as this writer sent it; None when it
        showed nothing (or the part was not sent here)."""
        ...

    def accept_part_proofs(self, proofs: Mapping[int, str]) -> None:
        """Proofs of parts that earlier writers of this upload sent (their ``part_proof``).
        A malformed proof is ignored; a part this writer sent keeps its own."""
        ...


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

    def begin(self, key: str, size: int, part_size: int, *, token: str | None = None) -> Writer: ...

    def delete(self, key: str) -> None: ...

    def copy(
        self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None
    ) -> ObjectInfo: ...

    def close(self) -> None: ...


@runtime_checkable
class SupportsReadInto(Protocol):
    """Optional: read straight into a caller's reusable buffer (1 MiB+ buffers, no copy)."""

    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int: ...


@runtime_checkable
class SupportsRename(Protocol):
    """Optional (``capabilities.atomic_rename``): atomically move ``src`` over ``dst``."""

    def rename(self, src_key: str, dst_key: str) -> ObjectInfo: ...


@runtime_checkable
class SupportsLink(Protocol):
    """Optional (``capabilities.hard_links``): make ``dst`` name the same bytes as ``src``
    (a hard link, or an independent copy where linking is impossible)."""

    def link(self, src_key: str, dst_key: str) -> ObjectInfo: ...


class GroupCommit(Protocol):
    """Many new small objects made durable together with a few flushes.

    ``begin`` writers, ``put_part`` as usual, ``stage(writer)`` each finished one (from any
    thread), then ``commit_all()`` once. Nothing is visible before ``commit_all``; when it
    returns, every returned name is durable, so the caller may record them. On an error
    nothing staged after the failure becomes visible.
    """

    def begin(self, key: str, size: int, part_size: int) -> Writer: ...

    def stage(self, writer: Writer) -> None: ...

    def commit_all(self) -> Mapping[str, ObjectInfo]: ...


@runtime_checkable
class SupportsGroupCommit(Protocol):
    """Optional (``capabilities.group_commit``): commit batches of small objects together."""

    def group_commit(self) -> GroupCommit: ...


class SmallPut(NamedTuple):
    """One object written by ``put_small``: what ``stat`` says of it, and the xxh3-128
    digest of its bytes re-read from the store at its key after the commit."""

    info: ObjectInfo
    digest: str


@runtime_checkable
class SupportsPutSmall(Protocol):
    """Optional (``capabilities.small_puts``): write many small whole objects in one call.

    ``put_small([(key, data), ...])`` returns, per item in order, a ``SmallPut`` or the
    exception that item failed with (one item's failure never fails the others). Each
    object is written whole and invisibly, made durable, then made visible at its key
    atomically (replacing any object there); every returned name is durable when the call
    returns; then each committed object is read back in full from the store and hashed, so
    the caller compares ``SmallPut.digest`` with the digest it expects (and deletes the key
    on a mismatch) before recording it. A failed item leaves nothing at its key. An error
    of the whole batch (a flush) is raised; names already committed are then harmless,
    as after a failed ``GroupCommit.commit_all``."""

    def put_small(
        self, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> list[SmallPut | Exception]: ...


@runtime_checkable
class SupportsLocalTree(Protocol):
    """Optional (``capabilities.local_tree``): keys are files under the local directory
    ``root``, so views can be built from hard links. Keys may name directories too; all go
    through ``check_key``. A clash with something datasync did not make raises ``Conflict``.
    """

    @property
    def root(self) -> str:
        """The filesystem path of the backend's root directory."""
        ...

    def make_durable(self, key: str) -> None:
        """fsync the file at ``key`` and every directory from its own up to the root."""
        ...

    def make_dirs(self, key: str) -> None:
        """Create the directory ``key`` and its missing parents, never following a
        symlink: a component that exists as anything but a real directory (a file, a
        symlink a user made) is a ``Conflict``, so nothing is ever written through it."""
        ...

    def is_dir(self, key: str) -> bool:
        """Is ``key`` a real directory (not a symlink to one)?"""
        ...

    def list_dir(self, key: str) -> list[str]:
        """The names in the directory ``key`` (empty when it does not exist), unsorted."""
        ...

    def link_new(self, src_key: str, dst_key: str, *, expect_digest: str) -> bool:
        """Hard-link ``src`` at the new name ``dst`` (``Conflict`` if it exists), creating
        parent directories, without fsync. Where hard links are impossible (EXDEV, EMLINK,
        EPERM, ENOTSUP) write an independent copy instead: temp file, fsync, re-hashed
        against ``expect_digest`` (``ChecksumMismatch`` otherwise), renamed in place.
        Returns True when it copied."""
        ...

    def link_many(self, links: Sequence[tuple[str, str]]) -> list[ObjectInfo | None]:
        """Hard-link each ``(src, dst)`` as ``link_new`` does, in one call and without its
        copy: per link, the new name's ``ObjectInfo`` (the source's inode, so its etag is
        the source's), or None where no link was made because the source does not exist
        or a hard link is impossible there (``link_new`` copies those)."""
        ...

    def sync_tree(self, prefix_key: str) -> None:
        """fsync every directory under ``prefix_key`` (deepest first) and its parent."""
        ...

    def rename_tree(self, src_key: str, dst_key: str) -> None:
        """Rename a directory (``Conflict`` if ``dst`` exists and is not an empty
        directory); creates ``dst``'s parents and fsyncs both parents."""
        ...

    def exchange(self, a_key: str, b_key: str) -> bool:
        """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``) and fsync their
        parents. False where the kernel or file system cannot (nothing changed)."""
        ...

    def set_symlink(self, key: str, target: str) -> None:
        """Create or atomically replace the symlink ``key -> target`` (relative, no
        ``..``). ``Conflict``, touching nothing, if ``key`` exists and is not a symlink."""
        ...

    def remove_symlink(self, key: str) -> None:
        """Remove the symlink ``key`` (nothing if absent; ``Conflict`` if not a symlink)."""
        ...

    def read_symlink(self, key: str) -> str | None:
        """The target of symlink ``key``; None if absent; ``Conflict`` if not a symlink."""
        ...

    def remove_tree(self, prefix_key: str) -> None:
        """Delete the directory tree at ``prefix_key`` (making its directories writable
        first); a missing tree is not an error."""
        ...

    def set_tree_readonly(self, prefix_key: str, readonly: bool) -> None:
        """Make every directory under ``prefix_key`` 0555 (or 0755 again); files keep their
        mode."""
        ...


def read_range_into(
    backend: Backend,
    key: str,
    offset: int,
    buf: bytearray | memoryview,
    *,
    etag: str | None = None,
) -> int:
    """Fill ``buf`` from ``key`` at ``offset``; return the byte count (short only at EOF).

    Uses the backend's own ``read_range_into`` when it has one, else ``read_range`` plus one
    copy, so callers can always hand out pooled buffers.
    """
    if isinstance(backend, SupportsReadInto):
        return backend.read_range_into(key, offset, buf, etag=etag)
    view = memoryview(buf).cast("B")
    data = backend.read_range(key, offset, len(view), etag=etag)
    view[: len(data)] = data
    return len(data)
