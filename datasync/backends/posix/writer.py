"""Writers of the POSIX backend: one temp-file upload (``PosixWriter``), a group commit
of many small objects (``PosixGroupCommit``) and its one-call form (``put_small``). All
work through ``PosixFiles``, never through the backend. The invariants are stated in the
package docstring.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Sequence

import xxhash

from datasync.backends.base import ObjectInfo, PartLayout, SmallPut, Writer
from datasync.backends.posix.files import PosixFiles
from datasync.backends.posix.io import (
    TOKEN_RE,
    fsync_dir,
    open_direct,
    pwrite_all,
    pwrite_direct,
    start_writeback,
    syncfs_fd,
    temp_name,
    translate_os_errors,
    unlink_quietly,
)
from datasync.errors import NotFound
from datasync.manifest.hashing import DIGEST_PREFIX

__all__ = ["PosixGroupCommit", "PosixWriter", "open_writer", "put_small"]


def open_writer(
    files: PosixFiles,
    key: str,
    size: int,
    part_size: int,
    token: str | None = None,
    defer: set[str] | None = None,
) -> PosixWriter:
    """A new upload (``token`` None) or the resumed upload ``token`` of ``key``.

    ``defer``: a group commit's set of directories to flush later instead of now."""
    layout = PartLayout(size, part_size)
    path = files.path(key)
    url = files.url(key)
    dirpath, name = os.path.split(path)
    if token is None:
        token = secrets.token_hex(8)
        tmp = os.path.join(dirpath, temp_name(name, token))
        fd = files.create_temp(dirpath, tmp, size, url, defer)
    else:
        if not TOKEN_RE.match(token):
            raise ValueError(f"not a posix upload token: {token!r}")
        tmp = os.path.join(dirpath, temp_name(name, token))
        with translate_os_errors(url, lookup=True):
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"upload {token} no longer exists", url=url) from None
            found = os.fstat(fd).st_size
        if found != size:
            os.close(fd)
            raise ValueError(f"upload {token} holds {found} bytes, not {size}")
    return PosixWriter(files, key, path, tmp, fd, layout, token, _direct_twin(files, tmp, fd))


def _direct_twin(files: PosixFiles, tmp: str, fd: int) -> int | None:
    """A second descriptor on the temp, with ``O_DIRECT``, for the large parts; None when
    the site writes buffered or its file system refuses direct I/O."""
    if not files.direct_io:
        return None
    dfd: int | None = None
    try:
        if os.fstat(fd).st_size >= files.writeback_min_bytes:
            dfd = open_direct(tmp, os.O_WRONLY)
        if dfd is not None and os.fstat(dfd).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(tmp)  # the name moved under us: stay buffered
    except OSError:
        if dfd is not None:
            os.close(dfd)
        return None  # direct I/O is only faster, never needed
    return dfd


class PosixWriter:
    """One upload into a temp file. ``put_part`` may be called from many threads."""

    def __init__(
        self,
        files: PosixFiles,
        key: str,
        path: str,
        tmp: str,
        fd: int,
        layout: PartLayout,
        token: str,
        direct_fd: int | None = None,
    ) -> None:
        self._files = files
        self._fd: int | None = fd
        self._direct_fd = direct_fd  # O_DIRECT twin of _fd for large parts, or None
        # Guards ``_fd``: abort() may run while other threads are in put_part, and a closed
        # descriptor number is soon reused by an unrelated open() in this process.
        self._fd_lock = threading.Lock()
        self._layout = layout
        self._token = token
        self.key = key
        self.path = path
        self.temp_path = tmp
        self.url = files.url(key)

    @property
    def token(self) -> str:
        return self._token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._layout.check(index, len(view))
        offset = self._layout.offset(index)
        # A private duplicate: if abort() closes the writer's fd meanwhile, this part still
        # lands in the (now unlinked) temp file, never in whatever reuses the number.
        large = len(view) >= self._files.writeback_min_bytes
        with translate_os_errors(self.url):
            fd, dfd = self._dups(direct=large)
            try:
                # Direct I/O writes the aligned head from the verified buffer itself and
                # returns once the device has it; the rest (an unaligned tail, or all of
                # it where direct I/O is off) goes through the page cache.
                done = pwrite_direct(dfd, view, offset) if dfd is not None else 0
                pwrite_all(fd, view[done:], offset + done)
                if large and not done:
                    start_writeback(fd, offset, len(view))
            finally:
                os.close(fd)
                if dfd is not None:
                    os.close(dfd)

    def durable_parts(self) -> set[int]:
        # The engine's chunk map is authoritative on POSIX (see the package docstring).
        return set()

    def commit(self) -> ObjectInfo:
        """Seal (mode, fsync), rename over the key, fsync the directory. Safe to call again
        after a failure: the descriptor is kept until success, and a rename that already
        happened is recognised by the inode."""
        fd = self._dup()
        try:
            self._files.seal(fd, self.url)
            with translate_os_errors(self.url):
                try:
                    os.rename(self.temp_path, self.path)
                except FileNotFoundError:
                    if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                        raise
                fsync_dir(os.path.dirname(self.path))
                st = os.stat(self.path)
        finally:
            os.close(fd)
        self.close()
        return self._files.info(self.key, st)

    def abort(self) -> None:
        self.close()
        with translate_os_errors(self.url):
            unlink_quietly(self.temp_path)

    def close(self) -> None:
        """Release the descriptor, keep the temp file: the upload can be resumed by token
        (and committed) by another writer. Idempotent; ``commit`` after it fails."""
        with self._fd_lock:
            fd, self._fd = self._fd, None
            dfd, self._direct_fd = self._direct_fd, None
        for f in (fd, dfd):
            if f is not None:
                os.close(f)

    def stage(self, *, sync: bool) -> None:
        """For a group commit: give the temp its final mode, fsync it when ``sync``, and
        release the descriptor. On failure the temp is removed."""
        fd = self._dup()
        try:
            with translate_os_errors(self.url):
                os.fchmod(fd, self._files.file_mode)
                if sync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.abort()
            raise
        os.close(fd)
        self.close()

    def __del__(self) -> None:
        # A writer dropped without commit/abort/close must not leak its descriptor.
        for name in ("_fd", "_direct_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _dup(self) -> int:
        return self._dups(direct=False)[0]

    def _dups(self, *, direct: bool) -> tuple[int, int | None]:
        """Duplicates of the descriptor and (``direct``) of its O_DIRECT twin, if any."""
        with self._fd_lock:
            if self._fd is None:
                raise ValueError(f"writer for {self.key} is already committed or aborted")
            fd = os.dup(self._fd)
            try:
                dfd = os.dup(self._direct_fd) if direct and self._direct_fd is not None else None
            except BaseException:
                os.close(fd)
                raise
            return fd, dfd


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

    def __init__(self, files: PosixFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._staged: list[PosixWriter] = []
        self.dirs: set[str] = set()  # directories whose entries changed (flushed at the end)
        self.flushes = 0  # fsync/syncfs calls made by this group (for tests and profiling)

    @property
    def mode(self) -> str:
        return self._files.group_sync

    def begin(self, key: str, size: int, part_size: int) -> PosixWriter:
        return open_writer(self._files, key, size, part_size, defer=self.dirs)

    def stage(self, writer: Writer) -> None:
        """The writer is complete: make its bytes durable now (``fsync`` mode, in the
        caller's thread) or at ``commit_all`` (``syncfs``); release its descriptor."""
        if not isinstance(writer, PosixWriter):
            raise TypeError(f"not a writer of this group: {writer!r}")
        writer.stage(sync=self.mode == "fsync")
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
        out: dict[str, ObjectInfo] = {}
        done = 0
        try:
            with translate_os_errors(self._files.root):
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
                    out[w.key] = self._files.info(w.key, os.stat(w.path))
        except BaseException:
            for w in staged[done:]:
                unlink_quietly(w.temp_path)
            raise
        return out

    def _syncfs(self) -> None:
        _syncfs(self._files.root)
        self.flushes += 1


def put_small(
    files: PosixFiles, items: Sequence[tuple[str, bytes | memoryview]]
) -> list[SmallPut | Exception]:
    """``SupportsPutSmall.put_small`` on POSIX: the group commit of many small objects in
    one loop, without a writer object, a retry wrapper or a limits check per object.

    Per item: a hidden sized temp (``create_temp``), its bytes written, its final mode,
    fsync'd (``fsync`` mode); then one ``syncfs`` (``syncfs`` mode), the renames, the names
    made durable (a second ``syncfs``, or one fsync per directory), and each object
    opened again at its key, read back in full (through the page cache, docs/design.md
    invariant 2) and hashed. A failure of one item removes its temp and is returned in its
    place; a failed flush is raised, with the temps not yet renamed removed."""
    out: list[SmallPut | Exception | None] = [None] * len(items)
    dirs: set[str] = set()  # directories whose entries changed
    sync_each = files.group_sync == "fsync"
    staged: list[tuple[int, str, str]] = []  # (index, temp, path)
    for i, (key, data) in enumerate(items):
        made = ""  # the temp, once created (create_temp removes it if it fails itself)
        try:
            url = files.url(key)
            path = files.path(key)
            dirpath, name = os.path.split(path)
            tmp = os.path.join(dirpath, temp_name(name, secrets.token_hex(8)))
            view = memoryview(data).cast("B")
            fd = files.create_temp(dirpath, tmp, len(view), url, dirs)
            made = tmp
            try:
                with translate_os_errors(url):
                    pwrite_all(fd, view, 0)
                    os.fchmod(fd, files.file_mode)
                    if sync_each:
                        os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as exc:
            if made:
                with contextlib.suppress(OSError):
                    unlink_quietly(made)
            out[i] = exc
            continue
        staged.append((i, tmp, path))
    renamed: list[tuple[int, str]] = []
    done = 0
    try:
        with translate_os_errors(files.root):
            if staged and not sync_each:
                _syncfs(files.root)  # every staged byte durable before any rename
            for i, tmp, path in staged:
                done += 1
                try:
                    with translate_os_errors(files.url(items[i][0])):
                        os.rename(tmp, path)
                except Exception as exc:
                    with contextlib.suppress(OSError):
                        unlink_quietly(tmp)
                    out[i] = exc
                    continue
                renamed.append((i, path))
                dirs.add(os.path.dirname(path))
            if renamed and not sync_each:
                _syncfs(files.root)  # the renames and the new directories
            elif renamed:
                for d in sorted(dirs, reverse=True):
                    fsync_dir(d)
    except BaseException:
        for _, tmp, _ in staged[done:]:
            unlink_quietly(tmp)
        raise
    for i, path in renamed:
        key = items[i][0]
        try:
            with translate_os_errors(files.url(key)):
                out[i] = _read_back(files, key, path)
        except Exception as exc:
            out[i] = exc
    return [o if o is not None else RuntimeError("put_small: item not handled") for o in out]


def _read_back(files: PosixFiles, key: str, path: str) -> SmallPut:
    """Open the committed file at its key again, read it whole, hash it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        hasher = xxhash.xxh3_128()
        while block := os.read(fd, max(st.st_size, 1 << 16)):
            hasher.update(block)
    finally:
        os.close(fd)
    return SmallPut(files.info(key, st), DIGEST_PREFIX + hasher.hexdigest())


def _syncfs(root: str) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs_fd(fd)
    finally:
        os.close(fd)
