"""Object-store views: server-side copies of blobs, each re-verified, completion marker last.

Each file's blob is copied server-side (or read and written where the store cannot) to
``<dataset>/<version-id>/<path>``; every copied object is re-read and re-hashed (a
server-side copy is trusted for nothing); ``.datasync-complete`` is written LAST, and a
reader treats a version prefix without it as absent (invariant 3). Objects a killed
publisher left are kept when they re-hash right. Files are processed in parallel batches
on the worker's I/O pool.

Requests per file, for a fresh view: the copy (a store that must pin the source first
stats it) and the re-read, pinned to the copy's version where the store enforces it. What
a killed publisher left is found by one listing of the version prefix, not a stat per key.
A copy is the check of its blob too: a copy whose blob is missing, or whose blob itself
hashes wrong, is a ``BlobDamaged``; all of them are collected over the whole view and
raised together (``BlobsDamaged``, one entry per blob) before any marker is written, so
the blob store heals in one re-plan. A damaged blob many files share is judged once: the
files after it are skipped, not copied and hashed again. A wrong copy of a right blob is
a retryable ``ChecksumMismatch``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice

from datasync.backends.base import Backend, ObjectInfo
from datasync.errors import ChecksumMismatch, NotFound, SourceChanged, StorageError
from datasync.transfer.buffers import BufferPool
from datasync.transfer.failpoints import failpoint
from datasync.transfer.layout import COMPLETE_MARKER, view_prefix
from datasync.transfer.readback import hash_object
from datasync.transfer.views.model import BlobDamaged, BlobsDamaged, PublishResult, ViewFile

__all__ = ["is_marked", "publish_objects", "put_small", "remove_unmarked_view"]

_PARALLEL = 64
_STREAM_PART = 8 * 1024 * 1024


def put_small(backend: Backend, key: str, data: bytes) -> None:
    writer = backend.begin(key, len(data), max(len(data), 1))
    try:
        if data:
            writer.put_part(0, data)
        writer.commit()
    except BaseException:
        with contextlib.suppress(StorageError):
            writer.abort()
        raise


def _copy_by_stream(backend: Backend, src: str, dst: str, size: int) -> None:
    part = max(backend.capabilities.min_part_size, _STREAM_PART)
    writer = backend.begin(dst, size, part)
    try:
        for i, off in enumerate(range(0, size, part)):
            writer.put_part(i, backend.read_range(src, off, min(part, size - off)))
        writer.commit()
    except BaseException:
        with contextlib.suppress(StorageError):
            writer.abort()
        raise


def _hashes_right(
    backend: Backend, key: str, f: ViewFile, seen: ObjectInfo, buffers: BufferPool | None
) -> bool:
    """Does ``key``, seen as ``seen``, hold ``f``'s bytes? Read pinned to the version seen
    where the store enforces it, so the size checked is the size of what is hashed."""
    pin = seen.etag if backend.capabilities.conditional_read else None
    if seen.size != f.size:
        return False
    try:
        return hash_object(backend, key, f.size, etag=pin, buffers=buffers) == f.digest
    except (NotFound, SourceChanged):  # replaced or removed since it was seen
        return False


def _holds(backend: Backend, key: str, f: ViewFile, buffers: BufferPool | None) -> bool:
    try:
        info = backend.stat(key)
    except NotFound:
        return False
    return _hashes_right(backend, key, f, info, buffers)


def _copy(backend: Backend, f: ViewFile, dst: str) -> ObjectInfo:
    """Copy ``f``'s blob pinned to the version recorded when it was verified (no stat);
    a blob rewritten since (a touch, or worse) is copied as it is now, and the re-hash
    of the copy decides."""
    if f.etag is None:
        return backend.copy(f.key, dst)
    try:
        return backend.copy(f.key, dst, source=ObjectInfo(f.key, f.size, f.etag, None))
    except SourceChanged:
        return backend.copy(f.key, dst)


def _place(
    backend: Backend,
    dst: str,
    f: ViewFile,
    left: ObjectInfo | None,
    buffers: BufferPool | None,
) -> bool:
    """Make ``dst`` hold ``f``'s verified bytes; True when it had to be copied by stream.
    ``left``: what the listing found at ``dst`` (a killed publisher's copy), else None."""
    if left is not None and _hashes_right(backend, dst, f, left, buffers):
        return False
    streamed = not backend.capabilities.server_side_copy
    try:
        if streamed:
            _copy_by_stream(backend, f.key, dst, f.size)
            right = _holds(backend, dst, f, buffers)
        else:
            right = _hashes_right(backend, dst, f, _copy(backend, f, dst), buffers)
    except NotFound as exc:
        raise BlobDamaged(f.digest, f.key, f"missing: {exc}") from exc
    if right:
        return streamed
    backend.delete(dst)
    if not _holds(backend, f.key, f, buffers):
        raise BlobDamaged(f.digest, f.key, "it no longer hashes to its digest")
    wrong = ChecksumMismatch(
        f"view copy of {f.path} does not hash to {f.digest}; deleted, will copy again",
        url=f"{backend.url}/{dst}",
    )
    wrong.retryable = True  # the blob is right: copying it again can succeed
    raise wrong


def is_marked(backend: Backend, prefix: str) -> bool:
    """Does the object-store view at ``prefix`` carry its completion marker (one stat)?"""
    try:
        backend.stat(f"{prefix}/{COMPLETE_MARKER}")
    except NotFound:
        return False
    return True


def _batches(items: Iterable[ViewFile], size: int) -> Iterator[list[ViewFile]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def publish_objects(
    backend: Backend,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    *,
    io: cf.Executor,
    buffers: BufferPool | None = None,
) -> PublishResult:
    prefix = view_prefix(dataset, version_id)
    marker = f"{prefix}/{COMPLETE_MARKER}"
    if is_marked(backend, prefix):
        return PublishResult(f"{backend.url}/{prefix}", 0, 0, 0, already=True)
    # What a killed publisher left: one listing instead of a stat per file.
    left = {info.key: info for info in backend.list(prefix + "/")}

    # Blobs found damaged, by digest: the other files of the view that share one (many
    # identical frames) are neither copied nor hashed again, and it is reported once.
    damaged: dict[str, BlobDamaged] = {}

    def place(f: ViewFile) -> bool:
        if f.digest in damaged:
            return False
        dst = f"{prefix}/{f.path}"
        try:
            return _place(backend, dst, f, left.get(dst), buffers)
        except BlobDamaged as damage:
            damaged.setdefault(f.digest, damage)
            return False

    n = nbytes = copied = 0
    for batch in _batches(files(), _PARALLEL):
        copied += sum(io.map(place, batch))
        n += len(batch)
        nbytes += sum(f.size for f in batch)
        failpoint("mid_publish")
    if damaged:
        raise BlobsDamaged(list(damaged.values()))
    failpoint("before_rename")
    body = {
        "dataset": dataset,
        "version_id": version_id,
        "files": n,
        "bytes": nbytes,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    put_small(backend, marker, json.dumps(body, sort_keys=True).encode())
    return PublishResult(f"{backend.url}/{prefix}", n, nbytes, copied, already=False)


def remove_unmarked_view(backend: Backend, dataset: str, version_id: str) -> int:
    """Delete what a failed publish left under the version's prefix, unless the view is
    complete (its marker exists). Returns the number of objects deleted."""
    prefix = view_prefix(dataset, version_id)
    if is_marked(backend, prefix):
        return 0
    gone = 0
    for obj in list(backend.list(prefix + "/")):
        backend.delete(obj.key)
        gone += 1
    return gone
