"""POSIX backend: local disks, NFS and Lustre, rooted at an existing directory.

Invariants:

* Nothing appears at a key before ``commit``. A writer fills a hidden temp file in the
  target directory, ``.<name>.datasync-<token>.part`` (deterministic from the token, so a
  resumed writer reopens it), preallocated to the final size; parts are ``pwrite`` at
  ``index * part_size`` from any thread; ``commit`` fsyncs the file, renames it over the
  key and fsyncs the directory. ``abort`` unlinks the temp. ``list`` never shows temps.
  Each part writes through its own ``dup`` of the writer's descriptor, so an ``abort``
  racing ``put_part`` can never redirect a part into another file that reused the number.
* ``durable_parts()`` is always empty (``capabilities.lists_parts`` is false): a
  preallocated file cannot tell written ranges from zeros, so the engine's chunk map in the
  database is authoritative. Resuming a token whose temp file is gone raises ``NotFound``,
  so stale zeros are never published. ``partial_uploads()`` finds temps left by crashed
  writers, for the auditor.
* The root is never created: a missing root (an unmounted file system) is ``NotFound``,
  not an empty tree. Directories below it are created on demand and left in place on
  delete (removing them would race with concurrent writers).
* Keys cannot leave the root (``check_key``); symlinks already inside the tree are trusted.
* OS errors are translated in one place, ``translate_os_errors``.
* A writer holds one descriptor until ``commit``/``abort``/``close``; ``close`` (a chunk
  task that wrote its parts and leaves the commit to another task) releases it and keeps
  the temp file for the next writer of the same token.
* Group commit (``group_commit()``, used for batches of small blobs): every member's bytes
  are durable BEFORE its rename makes it visible at its key, and ``commit_all`` returns
  only after every renamed name and every directory created for the group is durable, so
  the caller records replicas after it returns, never before. Two ways, chosen by
  ``group_sync``: ``fsync`` (each temp fsynced, then every distinct directory once per
  group) or ``syncfs`` (one ``syncfs`` before the renames, one after: 2 flushes per group
  instead of ~3 per file). ``auto`` picks ``syncfs`` on local file systems
  (``SYNCFS_TYPES``), ``fsync`` elsewhere (NFS, Lustre: a client-wide flush there may
  wait for other writers' data). ``syncfs`` reports write-back errors since Linux 5.8.
* Large files: each ``put_part`` starts write-back of its range (``sync_file_range``
  ``SYNC_FILE_RANGE_WRITE``, no wait), so the fsync at ``commit`` finds most pages already
  written instead of starting the whole file's write-back then.

Lustre: when the root is on Lustre (or ``lustre = true``), each new temp file is created
with its layout by ``lfs setstripe`` before any byte is written (see ``lustre.py``).

Modules: this one holds the backend; ``posix_writer.py`` the writer and the group commit;
``posix_io.py`` the system-call helpers and the one OS-error translation.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat as statmod
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult

from datasync.backends.base import Capabilities, ObjectInfo, PartLayout, check_key, join_url
from datasync.backends.lustre import DEFAULT_LARGE_LAYOUT, fs_type, stripe_policy
from datasync.backends.posix_io import (
    GROUP_SYNC_MODES,
    SYNCFS_TYPES,
    TEMP_RE,
    TOKEN_RE,
    check_range,
    copy_fd,
    fsync_dir,
    is_temp_name,
    option_bool,
    os_error_to_storage,
    preallocate_fd,
    temp_name,
    translate_os_errors,
    unlink_quietly,
)
from datasync.backends.posix_writer import PosixGroupCommit, PosixWriter
from datasync.errors import (
    ConfigError,
    InvalidPath,
    NotFound,
    SourceChanged,
    StorageError,
)

__all__ = [
    "PosixBackend",
    "PosixGroupCommit",
    "PosixWriter",
    "is_temp_name",
    "os_error_to_storage",
    "temp_name",
    "translate_os_errors",
]

log = logging.getLogger(__name__)


class PosixBackend:
    """Files under ``root``. Thread-safe: it holds no per-call state."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        lustre: bool | str = "auto",
        stripe_small_count: int = 1,
        large_threshold_bytes: int = 1024**3,
        large_layout: str | Sequence[str] = DEFAULT_LARGE_LAYOUT,
        preallocate: bool = True,
        lfs_command: str | None = None,
        mountinfo: str = "/proc/self/mountinfo",
        group_sync: str = "auto",
        writeback_min_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.preallocate = preallocate
        if group_sync not in GROUP_SYNC_MODES:
            raise ValueError(f"group_sync must be one of {', '.join(GROUP_SYNC_MODES)}")
        if group_sync == "auto":
            group_sync = "syncfs" if fs_type(self.root, mountinfo) in SYNCFS_TYPES else "fsync"
        self.group_sync = group_sync
        # Parts smaller than this are left to the commit's fsync (no early write-back call).
        self.writeback_min_bytes = writeback_min_bytes
        self.striping = stripe_policy(
            self.root,
            lustre=lustre,
            stripe_small_count=stripe_small_count,
            large_threshold_bytes=large_threshold_bytes,
            large_layout=large_layout,
            lfs_command=lfs_command,
            mountinfo=mountinfo,
        )

    @classmethod
    def from_url(cls, url: SplitResult, options: Mapping[str, Any]) -> PosixBackend:
        known = {
            "lustre",
            "stripe_small_count",
            "large_threshold_bytes",
            "large_layout",
            "preallocate",
            "lfs_command",
            "group_sync",
            "writeback_min_bytes",
        }
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown posix backend option(s): {', '.join(sorted(unknown))}")
        kwargs = dict(options)
        if "preallocate" in kwargs:
            kwargs["preallocate"] = option_bool(kwargs["preallocate"], "preallocate")
        if "writeback_min_bytes" in kwargs:
            kwargs["writeback_min_bytes"] = int(kwargs["writeback_min_bytes"])
        if not url.path:
            raise ConfigError("posix URL needs a path")
        try:
            return cls(url.path, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad posix backend option for {url.path}: {exc}") from exc

    # -- protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.root

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            server_side_copy=True,
            atomic_rename=True,
            hard_links=True,
            conditional_read=True,
            lists_parts=False,
            lustre_striping=self.striping is not None,
        )

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with translate_os_errors(self._key_url(key)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = os.stat(self._unnormalized_path(key))
        if not statmod.S_ISREG(st.st_mode):
            raise NotFound("not a regular file", url=self._key_url(key))
        return self._info(key, st)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        head, _, _ = prefix.rpartition("/")
        with translate_os_errors(self._key_url(prefix)):
            if not os.path.isdir(self.root):
                raise NotFound("root directory does not exist (not mounted?)", url=self.root)
            if head:
                check_key(head)
                yield from self._walk(os.path.join(self.root, head), head + "/", prefix)
            else:
                yield from self._walk(self.root, "", prefix)

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        check_range(offset, length)
        chunks: list[bytes] = []
        with self._open_for_read(key, etag) as (fd, size):
            pos, end = offset, min(size, offset + length)
            while pos < end:
                chunk = os.pread(fd, end - pos, pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int:
        check_range(offset, 0)
        view = memoryview(buf).cast("B")
        with self._open_for_read(key, etag) as (fd, size):
            want = max(0, min(len(view), size - offset))
            done = 0
            while done < want:
                n = os.preadv(fd, [view[done:want]], offset + done)
                if n == 0:
                    break
                done += n
        return done

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> PosixWriter:
        return self._begin(key, size, part_size, token, None)

    def group_commit(self) -> PosixGroupCommit:
        """A group of new small objects made durable together (see the module docstring)."""
        return PosixGroupCommit(self)

    def make_durable(self, key: str) -> None:
        """Make an object found at ``key`` durable: fsync it and every directory from its
        own up to the root (for adopting an object a killed group left renamed but not
        yet flushed)."""
        path = self._path(key)
        with translate_os_errors(self._key_url(key)):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            current = os.path.dirname(path)
            while True:
                fsync_dir(current)
                if current == self.root or len(current) <= len(self.root):
                    break
                current = os.path.dirname(current)

    def _begin(
        self,
        key: str,
        size: int,
        part_size: int,
        token: str | None,
        group: PosixGroupCommit | None,
    ) -> PosixWriter:
        layout = PartLayout(size, part_size)
        path = self._path(key)
        url = self._key_url(key)
        dirpath, name = os.path.split(path)
        if token is None:
            token = secrets.token_hex(8)
            tmp = os.path.join(dirpath, temp_name(name, token))
            fd = self._create_temp(dirpath, tmp, size, url, None if group is None else group.dirs)
        else:
            if not TOKEN_RE.match(token):
                raise ValueError(f"not a posix upload token: {token!r}")
            tmp = os.path.join(dirpath, temp_name(name, token))
            with translate_os_errors(url):
                try:
                    fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise NotFound(f"upload {token} no longer exists", url=url) from None
                found = os.fstat(fd).st_size
            if found != size:
                os.close(fd)
                raise ValueError(f"upload {token} holds {found} bytes, not {size}")
        return PosixWriter(self, key, path, tmp, fd, layout, token)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with translate_os_errors(self._key_url(key)):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            fsync_dir(os.path.dirname(path))

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """An independent copy (copy_file_range: a reflink on file systems that have them,
        never a hard link), published atomically like a commit."""
        src, dst = self._path(src_key), self._path(dst_key)
        url = self._key_url(dst_key)
        with translate_os_errors(self._key_url(src_key)):
            sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with translate_os_errors(self._key_url(src_key)):
                st = os.fstat(sfd)
            if not statmod.S_ISREG(st.st_mode):
                raise NotFound("not a regular file", url=self._key_url(src_key))
            dirpath, name = os.path.split(dst)
            tmp = os.path.join(dirpath, temp_name(name, secrets.token_hex(8)))
            dfd = self._create_temp(dirpath, tmp, st.st_size, url)
            try:
                with translate_os_errors(url):
                    copy_fd(sfd, dfd, st.st_size)
                    os.fsync(dfd)
            except BaseException:
                os.close(dfd)
                unlink_quietly(tmp)
                raise
            os.close(dfd)
            return self._publish(dst_key, tmp, dst)
        finally:
            os.close(sfd)

    def rename(self, src_key: str, dst_key: str) -> ObjectInfo:
        src, dst = self._path(src_key), self._path(dst_key)
        self._ensure_dir(os.path.dirname(dst), self._key_url(dst_key))
        with translate_os_errors(self._key_url(src_key)):
            os.rename(src, dst)
            fsync_dir(os.path.dirname(dst))
            if os.path.dirname(src) != os.path.dirname(dst):
                fsync_dir(os.path.dirname(src))
        return self.stat(dst_key)

    def link(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Hard-link ``dst`` to ``src`` (atomically replacing ``dst``); copy instead across
        devices, at the link limit, or where the file system has no hard links."""
        src, dst = self._path(src_key), self._path(dst_key)
        dirpath, name = os.path.split(dst)
        self._ensure_dir(dirpath, self._key_url(dst_key))
        tmp = os.path.join(dirpath, temp_name(name, secrets.token_hex(8)))
        with translate_os_errors(self._key_url(src_key)):
            try:
                os.link(src, tmp, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP):
                    log.info("hard link %s -> %s impossible (%s); copying", src, dst, exc)
                    return self.copy(src_key, dst_key)
                raise
        return self._publish(dst_key, tmp, dst)

    def close(self) -> None:
        pass

    def partial_uploads(self) -> Iterator[tuple[str, str, float]]:
        """``(temp path, token, mtime)`` of every unfinished upload under the root.

        Crashed writers leave these behind. The caller (the auditor) decides which are
        stale, e.g. older than any live lease, and removes them by path.
        """
        with translate_os_errors(self.root):
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    match = TEMP_RE.match(name)
                    if match is None:
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        mtime = os.stat(path, follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue  # committed or aborted meanwhile
                    yield path, match.group(2), mtime

    # -- internals ------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        check_key(key)
        if is_temp_name(key.rpartition("/")[2]):
            raise InvalidPath(f"object key {key!r} uses the datasync temp-file pattern")
        return f"{self.root}/{key}"

    def _unnormalized_path(self, key: str) -> str:
        """The on-disk spelling of ``key`` when it differs only by Unicode normalization.

        Manifests record NFC paths (docs/manifest-format.md), but a registration source may
        hold names written in NFD (macOS tools do). Reads of such a key resolve each missing
        segment to the one directory entry with the same NFC form; registration rejected
        trees holding two. Raises ``FileNotFoundError`` when there is none.
        """
        if key.isascii():
            raise FileNotFoundError(errno.ENOENT, "no such file", key)
        current = self.root
        for segment in key.split("/"):
            exact = os.path.join(current, segment)
            if os.path.lexists(exact):
                current = exact
                continue
            want = unicodedata.normalize("NFC", segment)
            twins = [n for n in os.listdir(current) if unicodedata.normalize("NFC", n) == want]
            if len(twins) != 1:
                raise FileNotFoundError(errno.ENOENT, "no such file", key)
            current = os.path.join(current, twins[0])
        return current

    def _key_url(self, key: str) -> str:
        return join_url(self.root, key)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        etag = f"{st.st_mtime_ns}-{st.st_ino}-{st.st_size}"
        return ObjectInfo(key, st.st_size, etag, st.st_mtime)

    @contextlib.contextmanager
    def _open_for_read(self, key: str, etag: str | None) -> Iterator[tuple[int, int]]:
        """An open fd and its size; checks ``etag`` before and after the caller reads."""
        path = self._path(key)
        url = self._key_url(key)
        with translate_os_errors(url):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(self._unnormalized_path(key), os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not statmod.S_ISREG(st.st_mode):
                    raise NotFound("not a regular file", url=url)
                self._check_etag(key, st, etag)
                yield fd, st.st_size
                # A write while we read moves mtime: catch it rather than return a mix.
                self._check_etag(key, os.fstat(fd), etag)
            finally:
                os.close(fd)

    def _check_etag(self, key: str, st: os.stat_result, etag: str | None) -> None:
        current = self._info(key, st).etag
        if etag is not None and current != etag:
            raise SourceChanged(
                f"file changed (etag {current}, expected {etag})", url=self._key_url(key)
            )

    def _walk(self, dirpath: str, base: str, prefix: str) -> Iterator[ObjectInfo]:
        """Files below ``dirpath`` in ascending key order.

        A directory sorts as ``name/``: every key inside it starts with that string, so
        visiting it at that position keeps the whole stream in code-point order (``a-b``
        before ``a/x`` before ``ab``).
        """
        try:
            with os.scandir(dirpath) as it:
                entries = []
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        entries.append((entry.name + "/", entry.path, True))
                    elif entry.is_file(follow_symlinks=False) and not is_temp_name(entry.name):
                        entries.append((entry.name, entry.path, False))
        except (FileNotFoundError, NotADirectoryError):
            return  # the prefix's directory does not exist (or vanished): nothing there
        entries.sort()
        for name, path, is_dir in entries:
            key = base + name
            if is_dir:
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(path, key, prefix)
            elif key.startswith(prefix):
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield self._info(key, st)

    def _ensure_dir(self, dirpath: str, url: str, defer: set[str] | None = None) -> None:
        """Create the directories between the root and ``dirpath``; never the root itself.

        The parent of each new directory is fsynced now, or added to ``defer`` (a group
        commit's set, flushed before any replica of the group is recorded)."""
        if not os.path.isdir(self.root):
            raise NotFound("root directory does not exist (not mounted?)", url=self.root)
        rel = os.path.relpath(dirpath, self.root)
        if rel == ".":
            return
        current = self.root
        created: list[str] = []
        with translate_os_errors(url):
            for part in rel.split(os.sep):
                current = os.path.join(current, part)
                try:
                    os.mkdir(current)
                    created.append(os.path.dirname(current))
                except FileExistsError:
                    if not os.path.isdir(current):
                        raise StorageError(
                            f"{current} is a file, so it cannot hold other keys", url=url
                        ) from None
                except NotADirectoryError:
                    raise StorageError(
                        f"a parent of {current} is a file, so it cannot hold other keys", url=url
                    ) from None
            if defer is not None:
                defer.update(created)
                return
            for parent in created:
                fsync_dir(parent)

    def _create_temp(
        self, dirpath: str, tmp: str, size: int, url: str, defer: set[str] | None = None
    ) -> int:
        """Create and size a temp file (with its Lustre layout); return an fd open for writing."""
        self._ensure_dir(dirpath, url, defer)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        if self.striping is None or not self.striping.create(tmp, size):
            flags |= os.O_EXCL
        with translate_os_errors(url):
            fd = os.open(tmp, flags, 0o666)
            try:
                if self.preallocate:
                    preallocate_fd(fd, size)
                else:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                unlink_quietly(tmp)
                raise
        return fd

    def _publish(self, key: str, tmp: str, dst: str) -> ObjectInfo:
        """Rename a finished temp over ``dst`` and make the rename durable."""
        url = self._key_url(key)
        try:
            with translate_os_errors(url):
                os.rename(tmp, dst)
                # rename() between two links of one inode succeeds and does nothing.
                unlink_quietly(tmp)
                fsync_dir(os.path.dirname(dst))
                st = os.stat(dst)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return self._info(key, st)
