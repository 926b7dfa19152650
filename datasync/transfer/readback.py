"""Read-back verification: the xxh3-128 digest of a stored object, re-read from the store.

Every verification in the engine (chunk before write, whole blob after commit, view copies
after a server-side copy) hashes bytes read back from the store with
``datasync.manifest.hashing``; a store's own metadata (ETag, CRC, size) is never trusted
as proof of content.

* POSIX: ``PosixBackend.digest``: a large file of a site that writes large parts with
  direct I/O is read back the same way (``O_DIRECT``, from the device, into one pool
  buffer); anything else with ``hash_file`` through the page cache.
* Other stores: ranged reads through ``backends.base.read_range_into`` into one buffer
  (the caller's, or one taken from the pool, never both, so a thread holding a buffer can
  verify without waiting on the budget), hashed at least 1 MiB at a time so xxhash
  releases the GIL and threads hash in parallel.
"""

from __future__ import annotations

from pathlib import Path

from datasync.backends.base import Backend, SupportsLocalTree, read_range_into
from datasync.backends.posix import PosixBackend, translate_os_errors
from datasync.backends.retrying import RetryingBackend
from datasync.manifest.hashing import ChunkedHasher, hash_file
from datasync.transfer.buffers import BufferPool, PoolBuffer

__all__ = ["VERIFY_BLOCK", "hash_object", "posix_root", "read_into"]

VERIFY_BLOCK = 8 * 1024 * 1024
_WHOLE = 2**62  # a chunk size no object reaches: ChunkedHasher then yields the whole digest


def posix_root(backend: Backend) -> Path | None:
    """The filesystem root of a backend whose keys are local files, else None."""
    if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
        return Path(backend.root)
    return None


def _posix(backend: Backend) -> PosixBackend | None:
    inner = backend.unwrap() if isinstance(backend, RetryingBackend) else backend
    return inner if isinstance(inner, PosixBackend) else None


def read_into(
    backend: Backend, key: str, offset: int, buf: memoryview, *, etag: str | None = None
) -> memoryview:
    """Read ``len(buf)`` bytes at ``offset`` (fewer at the end); return the filled view."""
    return buf[: read_range_into(backend, key, offset, buf, etag=etag)]


def hash_object(
    backend: Backend,
    key: str,
    size: int,
    *,
    etag: str | None = None,
    buffers: BufferPool | None = None,
    buf: memoryview | None = None,
    block: int = VERIFY_BLOCK,
) -> str:
    """The digest of ``key``'s first ``size`` bytes (a shorter object hashes short, so the
    comparison with the manifest digest fails)."""
    root = posix_root(backend)
    if root is not None and etag is None:
        posix = _posix(backend)
        if posix is None:
            with translate_os_errors(f"{backend.url}/{key}"):
                return hash_file(root / key, _WHOLE)[0]
        if buf is not None or buffers is None or not posix.reads_direct(size):
            return posix.digest(key, buf)
        with buffers.lease(min(block, size)) as lent, memoryview(lent) as mem:
            return posix.digest(key, mem)
    hasher = ChunkedHasher(_WHOLE)
    owned: PoolBuffer | bytearray | None = None
    if buf is None:
        want = min(block, max(size, 1))
        owned = buffers.acquire(want) if buffers is not None else bytearray(want)
        buf = memoryview(owned)[:want]
    try:
        offset = 0
        while offset < size:
            got = read_into(backend, key, offset, buf[: min(len(buf), size - offset)], etag=etag)
            if not len(got):
                break
            hasher.update(got)
            offset += len(got)
        return hasher.result().digest
    finally:
        if owned is not None:
            buf.release()
            if buffers is not None and isinstance(owned, PoolBuffer):
                buffers.release(owned)
