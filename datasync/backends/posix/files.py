"""``PosixFiles``: the small public helper the POSIX backend and its writers share.

It knows the root and the site's file options, and does the few things every write path
needs: key -> path (``check_key``, and never a temp-file name), ``ObjectInfo`` from a
stat, creating the directories below the root (never the root itself: an unmounted file
system must stay ``NotFound``), creating a sized temp file (with its Lustre layout), and
publishing a finished temp (mode ``file_mode``, rename, directory fsync).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as statmod
import unicodedata
from dataclasses import dataclass

from datasync.backends.base import ObjectInfo, check_key, join_url
from datasync.backends.posix.io import (
    fsync_dir,
    is_temp_name,
    preallocate_fd,
    temp_name,
    translate_os_errors,
    unlink_quietly,
)
from datasync.backends.posix.lustre import StripePolicy
from datasync.errors import Conflict, InvalidPath, NotFound

__all__ = ["PosixFiles"]


@dataclass(frozen=True, slots=True)
class PosixFiles:
    """Paths and file creation under ``root`` (an absolute path). Thread-safe."""

    root: str
    file_mode: int = 0o444  # committed files are read-only: an accidental `>>` fails
    preallocate: bool = True
    striping: StripePolicy | None = None
    group_sync: str = "fsync"  # "fsync" | "syncfs", resolved by the backend
    # Parts of at least this many bytes go to disk at once: direct I/O where ``direct_io``
    # (resolved by the backend), else early write-back.
    writeback_min_bytes: int = 8 * 1024 * 1024
    direct_io: bool = False

    def path(self, key: str) -> str:
        check_key(key)
        if is_temp_name(key.rpartition("/")[2]):
            raise InvalidPath(f"object key {key!r} uses the datasync temp-file pattern")
        return f"{self.root}/{key}"

    def url(self, key: str) -> str:
        return join_url(self.root, key)

    @staticmethod
    def info(key: str, st: os.stat_result) -> ObjectInfo:
        etag = f"{st.st_mtime_ns}-{st.st_ino}-{st.st_size}"
        return ObjectInfo(key, st.st_size, etag, st.st_mtime)

    def new_temp(self, path: str) -> str:
        """A fresh temp path beside ``path``."""
        dirpath, name = os.path.split(path)
        return os.path.join(dirpath, temp_name(name, secrets.token_hex(8)))

    def unnormalized_path(self, key: str) -> str:
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

    def check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound("root directory does not exist (not mounted?)", url=self.root)

    def ensure_dir(self, dirpath: str, url: str, defer: set[str] | None = None) -> None:
        """Create the directories between the root and ``dirpath``; never the root itself.

        The parent of each new directory is fsynced now, or added to ``defer`` (a group
        commit's set, flushed before any replica of the group is recorded). Tried from the
        deepest directory up, so a new leaf under existing parents (a blob store's fan-out)
        costs one ``mkdir``."""
        if dirpath != self.root and os.path.isdir(dirpath):
            return  # the common case (a blob store's fan-out dirs exist): one stat
        rel = os.path.relpath(dirpath, self.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            self.check_root()
            return
        missing: list[str] = []  # deepest first
        current = os.path.join(self.root, rel)
        created: list[str] = []
        with translate_os_errors(url):
            while current != self.root:
                try:
                    os.mkdir(current)
                except (FileNotFoundError, NotADirectoryError):  # a parent is missing (or a file)
                    missing.append(current)
                    current = os.path.dirname(current)
                    continue
                except FileExistsError:
                    if not os.path.isdir(current):
                        raise Conflict(
                            f"{current} is a file, so it cannot hold other keys", url=url
                        ) from None
                else:
                    created.append(os.path.dirname(current))
                break
            else:
                self.check_root()  # nothing below the root exists: is the root there?
                raise FileNotFoundError(errno.ENOENT, "cannot create directories", dirpath)
            for path in reversed(missing):
                try:
                    os.mkdir(path)
                    created.append(os.path.dirname(path))
                except FileExistsError:  # made meanwhile by another writer
                    if not os.path.isdir(path):
                        raise Conflict(
                            f"{path} is a file, so it cannot hold other keys", url=url
                        ) from None
            if defer is not None:
                defer.update(created)
                return
            for parent in created:
                fsync_dir(parent)

    def create_temp(
        self, dirpath: str, tmp: str, size: int, url: str, defer: set[str] | None = None
    ) -> int:
        """Create and size a temp file (with its Lustre layout); return an fd open for writing."""
        self.ensure_dir(dirpath, url, defer)
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

    def seal(self, fd: int, url: str) -> None:
        """Give a finished temp its final mode and make its bytes durable."""
        with translate_os_errors(url):
            os.fchmod(fd, self.file_mode)
            os.fsync(fd)

    def publish(self, key: str, tmp: str, dst: str) -> ObjectInfo:
        """Rename a finished (sealed) temp over ``dst`` and make the rename durable."""
        url = self.url(key)
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
        return self.info(key, st)

    def open_regular(self, key: str) -> tuple[int, os.stat_result]:
        """An fd open for reading on the regular file at ``key`` (NFD spellings found
        too), and its stat; ``NotFound`` for anything else."""
        path, url = self.path(key), self.url(key)
        with translate_os_errors(url, lookup=True):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(self.unnormalized_path(key), os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
        if not statmod.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotFound("not a regular file", url=url)
        return fd, st
