"""Registration from an object store: stream a listing, hash every object with ranged reads.

``scan_backend(backend, prefix, chunk_size=..., workers=...)`` yields one ``FileEntry`` per
object in canonical order (UTF-8 bytes of the normalized path), with the same digests
``scan_directory`` computes for the same bytes on a local disk, so a tree registered from
``s3://``/``az://``/``gs://`` gets the same ``version_id`` as its local copy.

Invariants:

* Paths are the keys relative to ``prefix``, checked by ``normalize_path``; a key whose
  NFC form differs is read under its own name and recorded under the normalized one. Two
  keys normalizing to the same path are an ``InvalidPath``.
* Backends list in code-point order (= UTF-8 byte order); NFC normalization can move a
  path, so entries pass through a bounded reorder window (``window`` entries of metadata)
  and a listing that is out of order beyond it fails loudly instead of producing a wrong
  manifest.
* Every range is read pinned to the ETag/generation seen in the listing: an object that
  changes during the scan raises ``SourceChanged`` (where the store enforces it).
* ``skip`` leaves out keys below ``prefix`` that start with one of its strings: a site
  root's ``.datasync/`` is datasync's, not dataset content (``manifest.remote`` decides).
* A file that another key needs as a directory (``a`` and ``a/b``) is refused by the
  ``VersionIdBuilder`` the entries go through, as for every source.
* Reads run on ``workers`` threads, ``read_size`` bytes each, across and within objects;
  at most ``2 * workers`` ranges are in memory. Hashing happens in order on the iterating
  thread (xxhash releases the GIL for these block sizes).
* ``on_progress(files_done, bytes_done)`` is called from the iterating thread.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from datasync.backends.base import Backend, ObjectInfo
from datasync.errors import InvalidPath, StorageError
from datasync.manifest.canonical import check_chunk_size, path_sort_key
from datasync.manifest.hashing import ChunkedHasher
from datasync.manifest.paths import normalize_path
from datasync.models import FileEntry

__all__ = ["DEFAULT_READ_SIZE", "ordered_objects", "scan_backend"]

DEFAULT_READ_SIZE = 8 * 1024 * 1024
ProgressCallback = Callable[[int, int], None]


def _dir_prefix(prefix: str) -> str:
    """A registration prefix names a directory: ``"data"`` and ``"data/"`` both list ``data/``."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def ordered_objects(
    infos: Iterator[ObjectInfo],
    prefix: str = "",
    *,
    window: int = 100_000,
    skip: tuple[str, ...] = (),
) -> Iterator[tuple[str, ObjectInfo]]:
    """``(normalized path, info)`` in canonical order, reordering within ``window``.

    ``prefix`` (ending in ``/`` or empty) is cut from every key to form the path; keys
    whose remainder starts with one of ``skip`` are left out."""
    pending: list[tuple[bytes, int, str, ObjectInfo]] = []  # seq breaks ties
    last: bytes | None = None

    def pop() -> tuple[str, ObjectInfo]:
        nonlocal last
        sort_key, _, path, info = heapq.heappop(pending)
        if last is not None and sort_key <= last:
            why = "is listed twice" if sort_key == last else "arrived too late to be reordered"
            raise InvalidPath(f"path {path!r} {why} (key {info.key!r})")
        last = sort_key
        return path, info

    for seq, info in enumerate(infos):
        rel = info.key[len(prefix) :]
        if info.key.endswith("/") or rel.startswith(skip):
            continue  # a "directory marker" some tools create, or a skipped subtree
        path = normalize_path(rel)
        sort_key = path_sort_key(path)
        if last is not None and sort_key <= last:
            raise InvalidPath(
                f"path {path!r} (key {info.key!r}) sorts before an emitted path: the listing "
                f"is out of order beyond {window} entries, or two keys normalize the same"
            )
        heapq.heappush(pending, (sort_key, seq, path, info))
        if len(pending) > window:
            yield pop()
    while pending:
        yield pop()


def _ranges(info: ObjectInfo, read_size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < info.size:
        yield offset, min(read_size, info.size - offset)
        offset += read_size


def scan_backend(
    backend: Backend,
    prefix: str = "",
    *,
    chunk_size: int,
    workers: int = 8,
    on_progress: ProgressCallback | None = None,
    read_size: int = DEFAULT_READ_SIZE,
    window: int = 100_000,
    skip: tuple[str, ...] = (),
) -> Iterator[FileEntry]:
    """Stream ``FileEntry`` for every object under ``prefix`` (see the module docstring),
    except those whose key below ``prefix`` starts with one of ``skip`` (a site root's
    ``.datasync/``)."""
    check_chunk_size(chunk_size)
    if workers < 1 or read_size < 1:
        raise ValueError(f"workers ({workers}) and read_size ({read_size}) must be positive")
    return _scan(backend, prefix, chunk_size, workers, on_progress, read_size, window, skip)


class _Slot:
    """One object being read: ranges in flight, in order, and its running hasher."""

    __slots__ = ("futures", "hasher", "info", "path")

    def __init__(self, path: str, info: ObjectInfo, chunk_size: int) -> None:
        self.path = path
        self.info = info
        self.futures: deque[Future[bytes]] = deque()
        self.hasher = ChunkedHasher(chunk_size)


def _scan(
    backend: Backend,
    prefix: str,
    chunk_size: int,
    workers: int,
    on_progress: ProgressCallback | None,
    read_size: int,
    window: int,
    skip: tuple[str, ...],
) -> Iterator[FileEntry]:
    prefix = _dir_prefix(prefix)
    objects = ordered_objects(backend.list(prefix), prefix, window=window, skip=skip)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datasync-cloudscan")
    slots: deque[_Slot] = deque()  # objects in listing order, head is hashed next
    cursor: tuple[_Slot, Iterator[tuple[int, int]]] | None = None  # object being submitted
    listing_done = False
    in_flight = 0
    limit = 2 * workers
    files_done = bytes_done = 0

    def read(info: ObjectInfo, offset: int, length: int) -> bytes:
        return backend.read_range(info.key, offset, length, etag=info.etag)

    def submit() -> None:
        """Keep ``limit`` ranges in flight, moving on through the listing as needed."""
        nonlocal cursor, listing_done, in_flight
        while in_flight < limit and not listing_done:
            if cursor is None:
                nxt = next(objects, None)
                if nxt is None:
                    listing_done = True
                    return
                slot = _Slot(nxt[0], nxt[1], chunk_size)
                slots.append(slot)
                cursor = (slot, _ranges(slot.info, read_size))
            slot, ranges = cursor
            rng = next(ranges, None)
            if rng is None:
                cursor = None
                continue
            slot.futures.append(pool.submit(read, slot.info, *rng))
            in_flight += 1

    try:
        while True:
            submit()
            if not slots:
                break
            head = slots[0]
            if head.futures:
                data = head.futures.popleft().result()
                in_flight -= 1
                head.hasher.update(data)
                bytes_done += len(data)
                continue
            if cursor is not None and cursor[0] is head:
                continue  # unreachable in practice: submit() just had room for it
            if head.hasher.size != head.info.size:
                raise StorageError(
                    f"object size changed while reading: listed {head.info.size}, "
                    f"read {head.hasher.size}",
                    url=f"{backend.url}/{head.info.key}",
                )
            slots.popleft()
            result = head.hasher.result()
            files_done += 1
            if on_progress is not None:
                on_progress(files_done, bytes_done)
            yield FileEntry(head.path, head.info.size, result.digest, result.chunks)
    finally:
        for slot in slots:
            for fut in slot.futures:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
