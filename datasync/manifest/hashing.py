"""Content digests: xxh3-128 of a whole file plus per-chunk digests of large files.

A digest is ``"xxh3-128:" + xxhash.xxh3_128(content).hexdigest()``: the same 32 hex
digits ``xxh128sum`` prints (pinned by ``tests/unit/test_hashing.py`` against the real
binary). A file larger than ``chunk_size`` also gets one digest per chunk, chunk ``i``
covering bytes ``[i*chunk_size, (i+1)*chunk_size)``; a file of at most ``chunk_size``
bytes has none.

Why it is shaped like this (numbers in ``docs/bench-results/hashing.md``):

* One pass over the bytes feeds both hashers. Chunk 0's digest is the whole-file
  hasher's digest at the first chunk boundary (xxh3 digests do not disturb the running
  state), so files of at most one chunk are hashed exactly once; for the rest, the
  second update runs on a buffer that is still hot in cache and costs little.
* Buffers are reused and small enough to stay in cache (default 2 MiB, at least 1 MiB so
  xxhash, which releases the GIL above 64 KiB, always runs without it). 8 MiB buffers
  measured slower here: they spill out of L2 between the read copy and the hash.
* One thread per file by default; both cores are used by hashing files in parallel
  (``scan_directory(workers=2)``). ``threads=2`` adds a reader thread that ``readv``s the
  next buffer while the caller hashes the previous one. On the 2-vCPU benchmark VM it was
  no faster than one thread from a warm page cache or a cold file (two xxh128sum
  processes were no faster than one there either), and only helped in runs where the
  file was partly cached; so it is opt-in. Whole-file and chunk hashing on separate
  threads (same buffers, or each reading its own copy) measured slower still.
* ``hash_stream`` gives byte-identical results for any block boundaries, so cloud sources
  hashed from ranged reads get the same digests as local files.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Final

import xxhash

from datasync.models import DIGEST_ALGORITHM

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DIGEST_PREFIX",
    "MIN_BUFFER_SIZE",
    "ChunkedHasher",
    "HashResult",
    "digest_bytes",
    "hash_fd",
    "hash_file",
    "hash_stream",
]

DIGEST_PREFIX: Final = DIGEST_ALGORITHM + ":"
MIN_BUFFER_SIZE: Final = 1024 * 1024
DEFAULT_BUFFER_SIZE: Final = 2 * 1024 * 1024
# A reader thread only pays off once a file spans several buffers.
_THREADED_MIN_BUFFERS: Final = 4
_PIPELINE_BUFFERS: Final = 3

OnBytes = Callable[[int], None]

_tls = threading.local()


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """The digest of ``data`` held in memory."""
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True, slots=True)
class HashResult:
    digest: str
    chunks: tuple[str, ...]
    size: int


class ChunkedHasher:
    """Incremental whole-file + per-chunk hasher; feed any block sizes, in order."""

    __slots__ = ("_chunk", "_chunk_size", "_chunks", "_done_chunks", "_in_chunk", "_size", "_whole")

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self._chunk_size = chunk_size
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._chunks: list[str] = []
        self._done_chunks = 0
        self._in_chunk = 0
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")  # slice by bytes, whatever the exporter's item type
        n = mv.nbytes
        cs = self._chunk_size
        pos = 0
        while pos < n:
            take = min(cs - self._in_chunk, n - pos)
            part = mv if take == n else mv[pos : pos + take]
            self._whole.update(part)
            if self._done_chunks:
                self._chunk.update(part)
            self._in_chunk += take
            pos += take
            if self._in_chunk == cs:
                if self._done_chunks:
                    self._chunks.append(DIGEST_PREFIX + self._chunk.hexdigest())
                    self._chunk.reset()
                else:
                    # Chunk 0 is the whole-file prefix: its digest is free.
                    self._chunks.append(DIGEST_PREFIX + self._whole.hexdigest())
                self._done_chunks += 1
                self._in_chunk = 0
        self._size += n

    def result(self) -> HashResult:
        """Digests of everything fed so far (the hasher stays usable)."""
        digest = DIGEST_PREFIX + self._whole.hexdigest()
        if self._size <= self._chunk_size:
            return HashResult(digest, (), self._size)
        chunks = list(self._chunks)
        if self._in_chunk:
            chunks.append(DIGEST_PREFIX + self._chunk.hexdigest())
        return HashResult(digest, tuple(chunks), self._size)


def hash_stream(
    blocks: Iterable[bytes | bytearray | memoryview], chunk_size: int
) -> tuple[str, tuple[str, ...]]:
    """Digest and chunk digests of the concatenation of ``blocks`` (any block sizes)."""
    hasher = ChunkedHasher(chunk_size)
    for block in blocks:
        hasher.update(block)
    result = hasher.result()
    return result.digest, result.chunks


def _thread_buffer(size: int) -> bytearray:
    # One reusable buffer per thread (scan's pool threads hash many small files).
    buf: bytearray | None = getattr(_tls, "buf", None)
    if buf is None or len(buf) != size:
        buf = bytearray(size)
        _tls.buf = buf
    return buf


def _hash_serial(
    fd: int, hasher: ChunkedHasher, buffer_size: int, on_bytes: OnBytes | None
) -> None:
    buf = _thread_buffer(buffer_size)
    mv = memoryview(buf)
    try:
        while n := os.readv(fd, [buf]):
            hasher.update(mv[:n] if n < buffer_size else mv)
            if on_bytes is not None:
                on_bytes(n)
    finally:
        mv.release()


def _hash_pipelined(
    fd: int, hasher: ChunkedHasher, buffer_size: int, on_bytes: OnBytes | None
) -> None:
    """A reader thread fills buffers while this thread hashes them (two cores)."""
    free: SimpleQueue[bytearray | None] = SimpleQueue()
    full: SimpleQueue[tuple[bytearray, int] | BaseException] = SimpleQueue()
    for _ in range(_PIPELINE_BUFFERS):
        free.put(bytearray(buffer_size))

    def reader() -> None:
        try:
            while (buf := free.get()) is not None:
                n = os.readv(fd, [buf])
                full.put((buf, n))
                if n == 0:
                    return
        except BaseException as exc:  # handed to the hashing thread, re-raised there
            full.put(exc)

    thread = threading.Thread(target=reader, name="datasync-hash-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            if n == 0:
                return
            with memoryview(buf) as mv:
                hasher.update(mv[:n] if n < buffer_size else mv)
            if on_bytes is not None:
                on_bytes(n)
            free.put(buf)
    finally:
        free.put(None)  # wakes the reader if it waits for a buffer; it then exits
        thread.join()


def hash_fd(
    fd: int,
    chunk_size: int,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    threads: int = 1,
    size_hint: int | None = None,
    on_bytes: OnBytes | None = None,
) -> HashResult:
    """Hash from ``fd``'s current offset to EOF. ``on_bytes(n)`` reports progress.

    ``threads >= 2`` pipelines reads and hashing (a reader thread) when ``size_hint`` says
    the file spans several buffers; see the module docstring for when that helps.
    """
    if buffer_size < MIN_BUFFER_SIZE:
        raise ValueError(f"buffer_size must be at least {MIN_BUFFER_SIZE} bytes")
    hasher = ChunkedHasher(chunk_size)
    if threads >= 2 and size_hint is not None and size_hint >= _THREADED_MIN_BUFFERS * buffer_size:
        _hash_pipelined(fd, hasher, buffer_size, on_bytes)
    else:
        _hash_serial(fd, hasher, buffer_size, on_bytes)
    return hasher.result()


def hash_file(
    path: str | os.PathLike[str],
    chunk_size: int,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    *,
    threads: int = 1,
    on_bytes: OnBytes | None = None,
) -> tuple[str, tuple[str, ...]]:
    """``(digest, chunk_digests)`` of the regular file at ``path`` (symlinks followed).

    Raises ``OSError`` as the OS reports it (callers translate), and ``IsADirectoryError``
    style ``OSError`` for anything that is not a regular file (never blocks on a FIFO).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file: {os.fsdecode(path)}")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        result = hash_fd(
            fd,
            chunk_size,
            buffer_size=buffer_size,
            threads=threads,
            size_hint=st.st_size,
            on_bytes=on_bytes,
        )
    finally:
        os.close(fd)
    return result.digest, result.chunks
