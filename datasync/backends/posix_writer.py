"""Writers of the POSIX backend: one temp-file upload (``PosixWriter``) and a group commit
of many small objects (``PosixGroupCommit``). The invariants are stated in ``posix.py``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING

from datasync.backends.base import ObjectInfo, PartLayout
from datasync.backends.posix_io import (
    fsync_dir,
    start_writeback,
    syncfs_fd,
    translate_os_errors,
    unlink_quietly,
)

if TYPE_CHECKING:
    from datasync.backends.posix import PosixBackend


class PosixWriter:
    """One upload into a temp file. ``put_part`` may be called from many threads."""

    def __init__(
        self,
        backend: PosixBackend,
        key: str,
        path: str,
        tmp: str,
        fd: int,
        layout: PartLayout,
        token: str,
    ) -> None:
        self._backend = backend
        self._key = key
        self._path = path
        self._tmp = tmp
        self._fd: int | None = fd
        # Guards ``_fd``: abort() may run while other threads are in put_part, and a closed
        # descriptor number is soon reused by an unrelated open() in this process.
        self._fd_lock = threading.Lock()
        self._layout = layout
        self._token = token
        self._url = backend._key_url(key)

    @property
    def token(self) -> str:
        return self._token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._layout.check(index, len(view))
        offset = self._layout.offset(index)
        # A private duplicate: if abort() closes the writer's fd meanwhile, this part still
        # lands in the (now unlinked) temp file, never in whatever reuses the number.
        with translate_os_errors(self._url):
            with self._fd_lock:
                fd = os.dup(self._open_fd())
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
                if done >= self._backend.writeback_min_bytes:
                    start_writeback(fd, offset, done)
            finally:
                os.close(fd)

    def durable_parts(self) -> set[int]:
        # See the module docstring: the engine's chunk map is authoritative on POSIX.
        return set()

    def commit(self) -> ObjectInfo:
        fd = self._take_fd()
        try:
            with translate_os_errors(self._url):
                os.fsync(fd)
        finally:
            os.close(fd)
        # On failure the temp stays, so the same token can be resumed and committed again.
        with translate_os_errors(self._url):
            os.rename(self._tmp, self._path)
            fsync_dir(os.path.dirname(self._path))
            st = os.stat(self._path)
        return self._backend._info(self._key, st)

    def abort(self) -> None:
        self.close()
        with translate_os_errors(self._url):
            unlink_quietly(self._tmp)

    def close(self) -> None:
        """Release the descriptor, keep the temp file: the upload can be resumed by token
        (and committed) by another writer. Idempotent; ``commit`` after it fails."""
        with self._fd_lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # A writer dropped without commit/abort/close must not leak its descriptor.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _take_fd(self) -> int:
        with self._fd_lock:
            fd = self._open_fd()
            self._fd = None
        return fd

    @property
    def temp_path(self) -> str:
        return self._tmp

    @property
    def path(self) -> str:
        return self._path

    @property
    def key(self) -> str:
        return self._key

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"writer for {self._key} is already committed or aborted")
        return self._fd


class PosixGroupCommit:
    """Commit many new objects with a few flushes instead of ~3 fsyncs each.

    ``begin`` (directories it creates are flushed with the group), ``put_part`` as usual,
    then ``stage(writer)`` from any thread, and finally ``commit_all()`` once. Objects are
    invisible until ``commit_all`` renames them, their bytes are durable before that
    rename, and every name is durable when it returns: only then may the caller record
    them. On an error nothing staged after the failure is renamed (its temp is removed);
    names already renamed are harmless (never recorded; a later attempt re-verifies them
    and calls ``make_durable`` before adopting them).
    """

    def __init__(self, backend: PosixBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._staged: list[PosixWriter] = []
        self.dirs: set[str] = set()  # directories whose entries changed (flushed at the end)
        self.flushes = 0  # fsync/syncfs calls made by this group (for tests and profiling)

    @property
    def mode(self) -> str:
        return self._backend.group_sync

    def begin(self, key: str, size: int, part_size: int) -> PosixWriter:
        return self._backend._begin(key, size, part_size, None, self)

    def stage(self, writer: PosixWriter) -> None:
        """The writer is complete: make its bytes durable now (``fsync`` mode, in the
        caller's thread) or at ``commit_all`` (``syncfs``); release its descriptor."""
        fd = writer._take_fd()
        try:
            if self.mode == "fsync":
                with translate_os_errors(writer._url):
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            writer.abort()
            raise
        os.close(fd)
        with self._lock:
            if self.mode == "fsync":
                self.flushes += 1
            self._staged.append(writer)

    def discard(self) -> None:
        """Remove the temps of every staged writer (nothing was renamed)."""
        with self._lock:
            staged, self._staged = self._staged, []
        for w in staged:
            unlink_quietly(w.temp_path)

    def commit_all(self) -> dict[str, ObjectInfo]:
        """Rename every staged object into place and make the names durable; return
        ``{key: info}``. Call once, from one thread."""
        with self._lock:
            staged, self._staged = self._staged, []
        if not staged:
            return {}
        backend = self._backend
        out: dict[str, ObjectInfo] = {}
        done = 0
        try:
            with translate_os_errors(backend.root):
                if self.mode == "syncfs":
                    self._syncfs()  # every staged byte durable before any rename
                for w in staged:
                    os.rename(w.temp_path, w.path)
                    done += 1
                    self.dirs.add(os.path.dirname(w.path))
                if self.mode == "syncfs":
                    self._syncfs()  # the renames and the new directories
                else:
                    # Deepest first is not needed for durability; sorted for determinism.
                    for d in sorted(self.dirs, reverse=True):
                        fsync_dir(d)
                        self.flushes += 1
                self.dirs.clear()
                for w in staged:
                    out[w.key] = backend._info(w.key, os.stat(w.path))
        except BaseException:
            for w in staged[done:]:
                unlink_quietly(w.temp_path)
            raise
        return out

    def _syncfs(self) -> None:
        fd = os.open(self._backend.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs_fd(fd)
        finally:
            os.close(fd)
        self.flushes += 1
