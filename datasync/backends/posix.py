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
  (``_SYNCFS_TYPES``), ``fsync`` elsewhere (NFS, Lustre: a client-wide flush there may
  wait for other writers' data). ``syncfs`` reports write-back errors since Linux 5.8.
* Large files: each ``put_part`` starts write-back of its range (``sync_file_range``
  ``SYNC_FILE_RANGE_WRITE``, no wait), so the fsync at ``commit`` finds most pages already
  written instead of starting the whole file's write-back then.

Lustre: when the root is on Lustre (or ``lustre = true``), each new temp file is created
with its layout by ``lfs setstripe`` before any byte is written (see ``lustre.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import stat as statmod
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult

from datasync.backends.base import Capabilities, ObjectInfo, PartLayout, check_key, join_url
from datasync.backends.lustre import DEFAULT_LARGE_LAYOUT, fs_type, stripe_policy
from datasync.errors import (
    ConfigError,
    InvalidPath,
    NoSpace,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    TransientError,
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

_TEMP_RE = re.compile(r"^\.(.+)\.datasync-([0-9a-f]{16,64})\.part$", re.DOTALL)
_TOKEN_RE = re.compile(r"^[0-9a-f]{16,64}$")
_NAME_MAX = 255

_NOT_FOUND = {errno.ENOENT, errno.ENOTDIR}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# Network and cluster file systems report failover and lost connections with these.
_TRANSIENT = {
    errno.EIO,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ESTALE,
    errno.ENOLCK,
    errno.ENOTCONN,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.EREMOTEIO,
    errno.ECOMM,
}
# copy_file_range cannot do this pair of files: fall back to sendfile.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY}
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def os_error_to_storage(exc: OSError, url: str) -> StorageError:
    """The ``StorageError`` for ``exc`` (caller chains it with ``from``)."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in _NOT_FOUND:
        return NotFound(reason, url=url)
    if code in _DENIED:
        return PermissionDenied(reason, url=url)
    if code in _NO_SPACE:
        return NoSpace(reason, url=url)
    if code in _TRANSIENT:
        return TransientError(reason, url=url)
    return StorageError(reason, url=url)


@contextlib.contextmanager
def translate_os_errors(url: str) -> Iterator[None]:
    """The one place where ``OSError`` becomes a ``StorageError``."""
    try:
        yield
    except OSError as exc:
        raise os_error_to_storage(exc, url) from exc


def temp_name(name: str, token: str) -> str:
    """Hidden temp file name for writing ``name`` under ``token``; fits NAME_MAX."""
    candidate = f".{name}.datasync-{token}.part"
    if len(os.fsencode(candidate)) <= _NAME_MAX:
        return candidate
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{digest}.datasync-{token}.part"


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes so ENOSPC shows up now, not mid-transfer.

    glibc's ``posix_fallocate`` emulates missing support by writing every block, which is
    slow on NFS; calling ``fallocate(2)`` directly lets us fall back to a sparse file.
    """
    if size > 0 and _fallocate()(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code not in _NO_FALLOCATE:
            raise OSError(code, os.strerror(code))
    os.ftruncate(fd, size)


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2), looked up once (at first use, not at import)."""
    fn = ctypes.CDLL(None, use_errno=True).fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


# Local file systems where syncfs(2) is a cheap, reliable flush of the group's data and names.
_SYNCFS_TYPES = frozenset({"ext4", "ext3", "xfs", "btrfs", "f2fs", "tmpfs", "bcachefs"})
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of dirty pages, do not wait
_GROUP_SYNC_MODES = ("auto", "fsync", "syncfs")


@functools.cache
def _libc_fn(name: str) -> Any:
    """A libc function by name, looked up once (at first use, not at import); None if absent."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def _syncfs(fd: int) -> None:
    """Flush the whole file system holding ``fd`` (data, inodes and directory entries)."""
    fn = _libc_fn("syncfs")
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if fn(ctypes.c_int(fd)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+length)`` back now (no wait, no
    durability promise: only so that the fsync at commit has less left to do)."""
    fn = _libc_fn("sync_file_range")
    if fn is None or length <= 0:
        return
    fn(
        ctypes.c_int(fd),
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
        ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _copy_fd(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes in the kernel: copy_file_range (reflink-capable), else sendfile."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
    while done < size:
        os.lseek(dst, done, os.SEEK_SET)
        n = os.sendfile(dst, src, done, size - done)
        if n == 0:
            break
        done += n
    if done != size:
        raise StorageError(f"source shrank during copy ({done} of {size} bytes)")


def _option_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"posix option {name} must be true or false, got {value!r}")


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
        if group_sync not in _GROUP_SYNC_MODES:
            raise ValueError(f"group_sync must be one of {', '.join(_GROUP_SYNC_MODES)}")
        if group_sync == "auto":
            group_sync = "syncfs" if fs_type(self.root, mountinfo) in _SYNCFS_TYPES else "fsync"
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
            kwargs["preallocate"] = _option_bool(kwargs["preallocate"], "preallocate")
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
        _check_range(offset, length)
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
        _check_range(offset, 0)
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
                _fsync_dir(current)
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
            if not _TOKEN_RE.match(token):
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
            _fsync_dir(os.path.dirname(path))

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
                    _copy_fd(sfd, dfd, st.st_size)
                    os.fsync(dfd)
            except BaseException:
                os.close(dfd)
                _unlink_quietly(tmp)
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
            _fsync_dir(os.path.dirname(dst))
            if os.path.dirname(src) != os.path.dirname(dst):
                _fsync_dir(os.path.dirname(src))
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
                    match = _TEMP_RE.match(name)
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
                _fsync_dir(parent)

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
                    _preallocate(fd, size)
                else:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
        return fd

    def _publish(self, key: str, tmp: str, dst: str) -> ObjectInfo:
        """Rename a finished temp over ``dst`` and make the rename durable."""
        url = self._key_url(key)
        try:
            with translate_os_errors(url):
                os.rename(tmp, dst)
                # rename() between two links of one inode succeeds and does nothing.
                _unlink_quietly(tmp)
                _fsync_dir(os.path.dirname(dst))
                st = os.stat(dst)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return self._info(key, st)


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
                    _start_writeback(fd, offset, done)
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
            _fsync_dir(os.path.dirname(self._path))
            st = os.stat(self._path)
        return self._backend._info(self._key, st)

    def abort(self) -> None:
        self.close()
        with translate_os_errors(self._url):
            _unlink_quietly(self._tmp)

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
            _unlink_quietly(w.temp_path)

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
                        _fsync_dir(d)
                        self.flushes += 1
                self.dirs.clear()
                for w in staged:
                    out[w.key] = backend._info(w.key, os.stat(w.path))
        except BaseException:
            for w in staged[done:]:
                _unlink_quietly(w.temp_path)
            raise
        return out

    def _syncfs(self) -> None:
        fd = os.open(self._backend.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)
        self.flushes += 1


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"bad range offset={offset} length={length}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
