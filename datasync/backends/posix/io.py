"""POSIX system-call helpers shared by the POSIX backend, its files helper and its writers.

OS errors are translated here, in one place (``translate_os_errors``), with one errno
table (docs/backends.md, "Errors"); temp-file names, preallocation, ``syncfs``, early
write-back, directory fsyncs and ``renameat2`` live here too, so the rest of the package
reads as policy, not as system calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

from datasync.errors import (
    ConfigError,
    Conflict,
    NoSpace,
    NotFound,
    PermissionDenied,
    StorageError,
    TransientError,
)

__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_TYPES",
    "GROUP_SYNC_MODES",
    "SYNCFS_TYPES",
    "TEMP_RE",
    "TOKEN_RE",
    "check_range",
    "copy_fd",
    "exchange_paths",
    "fsync_dir",
    "is_temp_name",
    "open_direct",
    "option_bool",
    "os_error_to_storage",
    "pread_direct",
    "preallocate_fd",
    "pwrite_all",
    "pwrite_direct",
    "rename_noreplace",
    "start_writeback",
    "syncfs_fd",
    "temp_name",
    "translate_os_errors",
    "unlink_quietly",
]


TEMP_RE = re.compile(r"^\.(.+)\.datasync-([0-9a-f]{16,64})\.part$", re.DOTALL)
TOKEN_RE = re.compile(r"^[0-9a-f]{16,64}$")
_NAME_MAX = 255

_NOT_FOUND = {errno.ENOENT}
# A name is taken by the wrong kind of thing (or a directory is not empty): a clash.
_CLASH = {errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY}
# EROFS too: a read-only mount refuses writes as firmly as a mode does.
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


def os_error_to_storage(exc: OSError, url: str, *, lookup: bool = False) -> StorageError:
    """The ``StorageError`` for ``exc`` (caller chains it with ``from``).

    ``lookup``: the call only looks a key up (stat, open for reading, unlink), where a file
    standing where a directory would be (ENOTDIR) means the key is absent, not a clash.
    """
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in _NOT_FOUND or (lookup and code == errno.ENOTDIR):
        return NotFound(reason, url=url)
    if code in _CLASH:
        return Conflict(reason, url=url)
    if code in _DENIED:
        return PermissionDenied(reason, url=url)
    if code in _NO_SPACE:
        return NoSpace(reason, url=url)
    if code in _TRANSIENT:
        return TransientError(reason, url=url)
    return StorageError(reason, url=url)


@contextlib.contextmanager
def translate_os_errors(url: str, *, lookup: bool = False) -> Iterator[None]:
    """The one place where ``OSError`` becomes a ``StorageError`` (see
    ``os_error_to_storage`` for ``lookup``)."""
    try:
        yield
    except OSError as exc:
        raise os_error_to_storage(exc, url, lookup=lookup) from exc


def temp_name(name: str, token: str) -> str:
    """Hidden temp file name for writing ``name`` under ``token``; fits NAME_MAX."""
    candidate = f".{name}.datasync-{token}.part"
    if len(os.fsencode(candidate)) <= _NAME_MAX:
        return candidate
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{digest}.datasync-{token}.part"


def is_temp_name(name: str) -> bool:
    return TEMP_RE.match(name) is not None


def preallocate_fd(fd: int, size: int) -> None:
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
SYNCFS_TYPES = frozenset({"ext4", "ext3", "xfs", "btrfs", "f2fs", "tmpfs", "bcachefs"})
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of dirty pages, do not wait
GROUP_SYNC_MODES = ("auto", "fsync", "syncfs")


@functools.cache
def _libc_fn(name: str) -> Any:
    """A libc function by name, looked up once (at first use, not at import); None if absent."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def syncfs_fd(fd: int) -> None:
    """Flush the whole file system holding ``fd`` (data, inodes and directory entries)."""
    fn = _libc_fn("syncfs")
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if fn(ctypes.c_int(fd)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# Direct I/O (O_DIRECT) for the large parts of big files: the device reads the verified
# buffer itself, so neither the part nor the read-back passes through the page cache.
# Where "auto" turns it on: local file systems and Lustre, whose O_DIRECT is plain
# (btrfs checksums and NFS's uncached semantics are left buffered).
DIRECT_TYPES = frozenset({"ext4", "xfs", "lustre"})
# Offsets, lengths and buffer addresses of direct transfers are multiples of this (the
# page size covers every logical block size in use).
DIRECT_ALIGN = 4096
# The kernel, the file system or the buffer refuse direct I/O: the caller goes buffered.
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def open_direct(path: str, flags: int) -> int | None:
    """``path`` opened with ``O_DIRECT`` added to ``flags``; None where the file system
    refuses it (tmpfs, some FUSE mounts), so the caller stays buffered."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, flags | direct | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _NO_DIRECT:
            return None
        raise


def pread_direct(fd: int, view: memoryview, offset: int) -> int | None:
    """One read through the ``O_DIRECT`` descriptor ``fd`` into the aligned head of
    ``view``; None when the buffer or the file system refuses direct I/O."""
    head = len(view) - len(view) % DIRECT_ALIGN
    try:
        return os.preadv(fd, [view[:head]], offset)
    except OSError as exc:
        if exc.errno in _NO_DIRECT:
            return None
        raise


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def pwrite_direct(fd: int, view: memoryview, offset: int) -> int:
    """Write the aligned head of ``view`` at ``offset`` through the ``O_DIRECT`` descriptor
    ``fd``; return how many bytes were written (a multiple of ``DIRECT_ALIGN``), 0 when the
    offset or the buffer is not aligned (the caller writes the rest buffered)."""
    head = len(view) - len(view) % DIRECT_ALIGN
    if offset % DIRECT_ALIGN or head == 0:
        return 0
    done = 0
    try:
        while done < head:
            n = os.pwrite(fd, view[done:head], offset + done)
            if n <= 0 or n % DIRECT_ALIGN:  # a short, unaligned write: finish buffered
                return done + max(n, 0)
            done += n
    except OSError as exc:
        if exc.errno not in _NO_DIRECT:
            raise
        # An unaligned buffer (not from the pool) or a file system that takes direct
        # opens but not these writes: the caller writes the rest buffered.
    return done


def start_writeback(fd: int, offset: int, length: int) -> None:
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


_RENAME_NOREPLACE = 1  # <linux/fs.h>
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# The kernel, libc or file system has no such rename: the caller falls back.
_NO_RENAMEAT2 = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _renameat2(a: str, b: str, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False where it is unavailable, else True or OSError."""
    fn = _libc_fn("renameat2")
    if fn is None:
        return False
    rc = fn(
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(a),
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(b),
        ctypes.c_uint(flags),
    )
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_RENAMEAT2:
        return False
    raise OSError(code, os.strerror(code), b)


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap ``a`` and ``b`` (``RENAME_EXCHANGE``). False where the kernel, libc
    or file system refuses it (nothing changed); other errors raise ``OSError``."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, raising ``FileExistsError`` if ``dst`` exists. Without
    ``RENAME_NOREPLACE`` the check and the rename are two steps (a narrow race)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def copy_fd(src: int, dst: int, size: int) -> None:
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


def option_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"posix option {name} must be true or false, got {value!r}")


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"bad range offset={offset} length={length}")


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
