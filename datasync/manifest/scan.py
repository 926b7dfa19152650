"""Scan a local directory tree into manifest entries, in canonical order, with bounded memory.

Order: each directory's children are sorted by the UTF-8 bytes of their NFC name, with
``/`` appended to directory names, and visited depth-first. That is exactly ascending
bytewise order of the full paths (``a.txt`` < ``a/x`` because ``.`` < ``/``), so the
stream can go straight into ``VersionIdBuilder`` without a global sort. Only one
directory listing per level of depth is held in memory, plus a bounded window of files
being hashed.

Policy (see ``docs/manifest-format.md``):

* Regular files are recorded; empty directories are not (a manifest lists files).
* A symlink whose target resolves to a regular file inside the root is recorded as a
  file with the target's bytes, under the link's own path. Symlinks to directories are
  rejected (cycles, and the same subtree under two names), as are links that escape the
  root, dangling or looping links, and links to special files.
* Sockets, FIFOs and devices are rejected (``UnsupportedFileType``).
* Names that are not valid UTF-8, hold control characters or a backslash, or are NFC
  twins of a sibling are rejected (``InvalidPath``), naming the directory and the
  spellings.
* A file that changes while it is hashed (size, mtime or ctime moved) raises
  ``SourceChanged``: the digest would describe no real state of the file.
* Names in ``exclude`` directly under the root are not visited (a site root's
  ``.datasync``, datasync's own blob store; ``manifest.remote`` decides).

This is the one scanner for every local tree: ``register /dir``, ``register SITE:path`` on
a POSIX site and ``file://`` URLs all come here (``manifest.remote``).

Hashing runs on a bounded thread pool; entries are yielded in walk order regardless of
which finishes first. With a stat cache, files go to the pool in runs of
``_RESOLVE_BATCH``: a task stats a run and looks it up in the cache with one query
(``StatCache.lookup_many``); hits are entries at once, and only misses are then hashed,
one task each. An unchanged tree thus costs a stat per file and one task and one query
per run, not a task and a query per file (which was most of an unchanged registration);
the stats still run in parallel, which is what counts on Lustre and NFS.

Files are opened with ``O_NOFOLLOW`` (a file swapped for a symlink after listing fails)
and ``O_NONBLOCK`` (a file swapped for a FIFO cannot hang the scan), and checked with
``fstat`` before reading.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from datasync.errors import (
    DatasyncError,
    InvalidManifest,
    InvalidPath,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    UnsupportedFileType,
)
from datasync.manifest.canonical import check_chunk_size
from datasync.manifest.hashing import DEFAULT_BUFFER_SIZE, hash_fd
from datasync.manifest.paths import normalize_name, normalize_path
from datasync.manifest.statcache import StatCache
from datasync.models import MAX_FILE_SIZE, FileEntry

__all__ = ["ProgressCallback", "scan_directory", "scan_total"]

ProgressCallback = Callable[[int, int], None]

_PROGRESS_INTERVAL_S: Final = 0.1
_WINDOW_PER_WORKER: Final = 8
_RESOLVE_BATCH: Final = 256  # files stat'ed and looked up in the stat cache per task


@dataclass(frozen=True, slots=True)
class _Item:
    rel: str  # normalized manifest path
    path: str  # where it was found (the link itself for symlinks)
    open_path: str  # what to open: path, or the resolved target of a symlink
    follow: bool  # True for a symlink to a file
    ident: tuple[int, int] | None  # (dev, ino) of a symlink's target at walk time


def _describe_mode(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return f"an unsupported file type (mode {mode:o})"


def _os_error(exc: OSError, path: str) -> DatasyncError:
    """Translate an OSError met while scanning into the project's tree."""
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"cannot read {path}: permission denied")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{path} disappeared while the tree was being scanned")
    if exc.errno == errno.ELOOP:
        return SourceChanged(f"{path} was replaced by a symlink while the tree was being scanned")
    return StorageError(f"cannot read {path}: {exc.strerror or exc}")


class _Walker:
    """Depth-first walk in canonical order; yields files, raises on anything rejected.

    Entries of the root named in ``exclude`` are not visited at all."""

    def __init__(self, root: str, exclude: Collection[str] = ()) -> None:
        self.root = root
        self.root_prefix = root.rstrip(os.sep) + os.sep
        self.exclude = frozenset(exclude)

    def _inside(self, target: str) -> bool:
        return target == self.root or target.startswith(self.root_prefix)

    def _symlink(self, entry: os.DirEntry[str], rel: str) -> _Item:
        try:
            link = os.readlink(entry.path)
        except OSError as exc:
            raise _os_error(exc, entry.path) from exc
        target = os.path.realpath(entry.path)
        if not self._inside(target):
            raise UnsupportedFileType(
                f"symlink {rel!r} -> {link!r} points outside the root {self.root}; "
                "copy the file into the tree or remove the link"
            )
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise UnsupportedFileType(f"symlink {rel!r} -> {link!r} is dangling") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedFileType(f"symlink {rel!r} -> {link!r} is a loop") from None
            raise _os_error(exc, entry.path) from exc
        if stat.S_ISDIR(st.st_mode):
            raise UnsupportedFileType(
                f"symlink {rel!r} -> {link!r} points to a directory; directory links are "
                "not followed (they allow cycles and duplicate subtrees)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedFileType(
                f"symlink {rel!r} -> {link!r} points to {_describe_mode(st.st_mode)}"
            )
        return _Item(rel, entry.path, target, True, (st.st_dev, st.st_ino))

    def _children(
        self, directory: str, prefix: str, exclude: frozenset[str] = frozenset()
    ) -> list[tuple[bytes, str, os.DirEntry[str]]]:
        """One directory's entries as (sort key, normalized rel path, entry), sorted."""
        where = prefix.rstrip("/") or "."
        seen: dict[str, str] = {}
        out: list[tuple[bytes, str, os.DirEntry[str]]] = []
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name in exclude:
                        continue
                    try:
                        name = normalize_name(entry.name)
                        rel = normalize_path(prefix + name)
                    except InvalidPath as exc:
                        raise InvalidPath(f"in directory {where!r}: {exc}") from None
                    twin = seen.get(name)
                    if twin is not None:
                        raise InvalidPath(
                            f"in directory {where!r}: {twin!r} and {entry.name!r} are the same "
                            "name after Unicode NFC normalization; rename one of them"
                        )
                    seen[name] = entry.name
                    is_dir = entry.is_dir(follow_symlinks=False)
                    key = (name + "/" if is_dir else name).encode("utf-8")
                    out.append((key, rel, entry))
        except OSError as exc:
            raise _os_error(exc, directory) from exc
        out.sort(key=lambda t: t[0])
        return out

    def __iter__(self) -> Iterator[_Item]:
        stack = [iter(self._children(self.root, "", self.exclude))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            _, rel, entry = child
            try:
                if entry.is_symlink():
                    yield self._symlink(entry, rel)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(iter(self._children(entry.path, rel + "/")))
                elif entry.is_file(follow_symlinks=False):
                    yield _Item(rel, entry.path, entry.path, False, None)
                else:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    raise UnsupportedFileType(
                        f"{rel!r} is {_describe_mode(mode)}; only regular files can be registered"
                    )
            except OSError as exc:
                raise _os_error(exc, entry.path) from exc


class _Progress:
    """Byte counter shared by hashing threads (files are counted by the consumer), and
    how many files are being read right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.reading = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def begin(self) -> int:
        """Count a file in; returns how many others are being read."""
        with self._lock:
            self.reading += 1
            return self.reading - 1

    def end(self) -> None:
        with self._lock:
            self.reading -= 1


_CPUS: Final = os.cpu_count() or 1


def _check_file(item: _Item, st: os.stat_result) -> None:
    """The file found at hashing time is still what the walk listed, and acceptable."""
    if stat.S_ISLNK(st.st_mode):
        raise SourceChanged(f"{item.rel!r} was replaced by a symlink while being scanned")
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFileType(
            f"{item.rel!r} is {_describe_mode(st.st_mode)}; only regular files can be registered"
        )
    if item.ident is not None and (st.st_dev, st.st_ino) != item.ident:
        raise SourceChanged(f"symlink {item.rel!r} was retargeted while it was being scanned")
    if st.st_size > MAX_FILE_SIZE:
        raise InvalidManifest(
            f"{item.rel!r} is {st.st_size} bytes, more than the {MAX_FILE_SIZE}-byte limit"
        )


def _resolve(
    items: list[_Item], chunk_size: int, cache: StatCache, progress: _Progress
) -> list[FileEntry | _Item]:
    """Stat a run of files and look them up in the stat cache at once: each hit becomes
    its entry (a stat only: no open/close, which is what costs on Lustre and NFS), each
    miss stays an item, for ``_hash_item``."""
    stats = []
    for item in items:
        try:
            st = os.stat(item.open_path, follow_symlinks=item.follow)
        except OSError as exc:
            raise _os_error(exc, item.path) from exc
        _check_file(item, st)
        stats.append((item.path, st))
    out: list[FileEntry | _Item] = []
    hit_bytes = 0
    for item, (_, st), hit in zip(items, stats, cache.lookup_many(stats, chunk_size), strict=True):
        if hit is None:
            out.append(item)
        else:
            out.append(FileEntry(item.rel, st.st_size, hit[0], hit[1]))
            hit_bytes += st.st_size
    progress.add(hit_bytes)
    return out


def _hash_item(
    item: _Item,
    chunk_size: int,
    cache: StatCache | None,
    hash_threads: int,
    buffer_size: int,
    progress: _Progress,
) -> FileEntry:
    """Hash one file (a stat-cache miss, or every file without a cache) and remember it."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if item.follow else os.O_NOFOLLOW)
    try:
        fd = os.open(item.open_path, flags)
    except OSError as exc:
        raise _os_error(exc, item.path) from exc
    try:
        st = os.fstat(fd)
        _check_file(item, st)
        started = time.time_ns()
        if st.st_size > buffer_size and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # A reader thread per file can only pay while a core is idle: with as many files
        # in flight as CPUs, it just competes with them.
        others = progress.begin()
        try:
            result = hash_fd(
                fd,
                chunk_size,
                buffer_size=buffer_size,
                threads=hash_threads if others + 1 < _CPUS else 1,
                size_hint=st.st_size,
                on_bytes=progress.add,
            )
        finally:
            progress.end()
        after = os.fstat(fd)
    except OSError as exc:
        raise _os_error(exc, item.path) from exc
    finally:
        os.close(fd)
    if (
        result.size != st.st_size
        or after.st_size != st.st_size
        or after.st_mtime_ns != st.st_mtime_ns
        or after.st_ctime_ns != st.st_ctime_ns
    ):
        raise SourceChanged(
            f"{item.rel!r} changed while it was being hashed ({st.st_size} bytes before, "
            f"{result.size} read); register again once it is stable"
        )
    if cache is not None:
        cache.store(item.path, st, chunk_size, result.digest, result.chunks, hashed_at_ns=started)
    return FileEntry(item.rel, result.size, result.digest, result.chunks)


def _resolve_root(root: Path) -> str:
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        raise InvalidPath(f"{root} is not a directory")
    return real


def scan_directory(
    root: Path,
    *,
    chunk_size: int,
    workers: int,
    stat_cache: StatCache | None = None,
    on_progress: ProgressCallback | None = None,
    hash_threads: int = 1,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    exclude: Collection[str] = (),
) -> Generator[FileEntry, None, None]:
    """Stream ``root``'s files as ``FileEntry`` in canonical order, hashing in parallel.

    ``workers`` files are hashed at once (that is how a scan uses several cores); with
    ``hash_threads >= 2`` a file spanning several buffers also gets a reader thread, but
    only while fewer files than CPUs are being read (see ``hashing``: opt-in, it did not
    pay on the benchmark VM). ``on_progress(files_done, bytes_done)`` is
    called from the iterating thread at most every 0.1 s (while waiting on a large file
    too) and once at the end. Root and chunk size are checked before this returns;
    everything else raises from the iterator. Closing the iterator early stops the pool.
    Names in ``exclude`` directly under the root are skipped (a site root's ``.datasync``).
    """
    check_chunk_size(chunk_size)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    walker = _Walker(_resolve_root(root), exclude)
    return _scan(walker, chunk_size, workers, stat_cache, on_progress, hash_threads, buffer_size)


_Resolved = list[FileEntry | _Item]  # a run of files after the stat-cache lookup
_Slot = FileEntry | Future[FileEntry] | Future[_Resolved]


def _scan(
    walker: _Walker,
    chunk_size: int,
    workers: int,
    cache: StatCache | None,
    on_progress: ProgressCallback | None,
    hash_threads: int,
    buffer_size: int,
) -> Generator[FileEntry, None, None]:
    progress = _Progress()
    files_done = 0
    last_report = time.monotonic()
    # Walk order: entries, files being hashed, and runs being looked up in the cache.
    window: deque[_Slot] = deque()
    in_window = 0  # files the window stands for
    max_in_flight = workers * (_WINDOW_PER_WORKER if cache is None else _RESOLVE_BATCH)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datasync-hash")

    def hash_later(item: _Item) -> Future[FileEntry]:
        return pool.submit(_hash_item, item, chunk_size, cache, hash_threads, buffer_size, progress)

    def wait(fut: Future[FileEntry] | Future[_Resolved]) -> FileEntry | _Resolved:
        nonlocal last_report
        while True:
            try:
                return fut.result(timeout=_PROGRESS_INTERVAL_S)
            except TimeoutError:
                if on_progress is not None:
                    on_progress(files_done, progress.bytes)
                    last_report = time.monotonic()

    def take() -> FileEntry:
        nonlocal files_done, last_report, in_window
        while True:
            slot = window.popleft()
            done = slot if isinstance(slot, FileEntry) else wait(slot)
            if isinstance(done, FileEntry):
                break
            # A looked-up run: hits stand in line as entries, misses are hashed now.
            window.extendleft(
                reversed([x if isinstance(x, FileEntry) else hash_later(x) for x in done])
            )
        in_window -= 1
        files_done += 1
        if on_progress is not None:
            now = time.monotonic()
            if now - last_report >= _PROGRESS_INTERVAL_S:
                on_progress(files_done, progress.bytes)
                last_report = now
        return done

    run: list[_Item] = []

    def look_up(cache: StatCache) -> None:
        nonlocal run
        window.append(pool.submit(_resolve, run, chunk_size, cache, progress))
        run = []

    try:
        for item in walker:
            in_window += 1
            if cache is None:
                window.append(hash_later(item))
            else:
                run.append(item)
                if len(run) >= _RESOLVE_BATCH:
                    look_up(cache)
            while in_window >= max_in_flight and window:
                yield take()
        if run and cache is not None:
            look_up(cache)
        while window:
            yield take()
        if on_progress is not None:
            on_progress(files_done, progress.bytes)
    finally:
        for slot in window:
            if isinstance(slot, Future):
                slot.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if cache is not None:
            cache.flush()


def scan_total(root: Path, exclude: Collection[str] = ()) -> tuple[int, int]:
    """``(files, bytes)`` from a stat-only walk, for a progress bar's totals.

    Best effort: it follows the same rules loosely (file symlinks counted, everything
    unreadable or unsupported skipped); ``scan_directory`` is the one that validates.
    """
    files = total = 0
    real_root = _resolve_root(root)
    stack = [real_root]
    while stack:
        directory = stack.pop()
        skip = exclude if directory == real_root else ()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name in skip:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=True):
                            files += 1
                            total += entry.stat(follow_symlinks=True).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return files, total
