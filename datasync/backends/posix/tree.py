"""The POSIX backend's local-tree operations (``SupportsLocalTree``): what views, labels and
unpublishing are built from.

Invariants:

* Every path comes from a key through ``PosixFiles.path`` (``check_key``: nothing leaves
  the root) and every ``OSError`` goes through ``translate_os_errors``.
* Nothing datasync did not make is replaced: ``link_new`` and the copy behind it only
  create new names, ``set_symlink``/``read_symlink`` refuse a key that is not a symlink,
  ``rename_tree`` refuses a non-empty destination (all ``Conflict``).
* A copy made where a hard link is impossible is new bytes: it is fsynced and re-hashed
  against the expected digest before its name appears.
* Symlinks are never followed while walking a tree (``sync_tree``, ``remove_tree``,
  ``set_tree_readonly``), so a link inside a view cannot make us touch anything outside.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat as statmod
from collections.abc import Sequence

from datasync.backends.base import ObjectInfo
from datasync.backends.posix.files import PosixFiles
from datasync.backends.posix.io import (
    copy_fd,
    exchange_paths,
    fsync_dir,
    os_error_to_storage,
    rename_noreplace,
    translate_os_errors,
    unlink_quietly,
)
from datasync.errors import ChecksumMismatch, Conflict, InvalidPath, NotFound
from datasync.manifest.hashing import hash_file

__all__ = ["LINK_IMPOSSIBLE", "LocalTreeOps"]

log = logging.getLogger(__name__)

# A hard link cannot be made here (other device, link limit, refused by the file system).
LINK_IMPOSSIBLE = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP})
_WHOLE = 2**62  # a chunk size no file reaches: hash_file then gives the whole-file digest
_DIR_READONLY = 0o555
_DIR_WRITABLE = 0o755


class LocalTreeOps:
    """Mixed into ``PosixBackend``; ``files`` is its ``PosixFiles``."""

    files: PosixFiles

    @property
    def root(self) -> str:
        return self.files.root

    def make_durable(self, key: str) -> None:
        """Make an object found at ``key`` durable: fsync it and every directory from its
        own up to the root (for adopting an object a killed group left renamed but not
        yet flushed)."""
        path = self.files.path(key)
        with translate_os_errors(self.files.url(key)):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_up(os.path.dirname(path))

    def make_dirs(self, key: str) -> None:
        path, url = self.files.path(key), self.files.url(key)
        self.files.check_root()
        current = self.files.root
        with translate_os_errors(url):
            for part in os.path.relpath(path, current).split(os.sep):
                current = os.path.join(current, part)
                try:
                    os.mkdir(current)
                    fsync_dir(os.path.dirname(current))
                except FileExistsError:
                    if not statmod.S_ISDIR(os.lstat(current).st_mode):
                        kind = "a symlink" if os.path.islink(current) else "not a directory"
                        raise Conflict(
                            f"{current} is {kind}; datasync writes only into directories it made",
                            url=url,
                        ) from None

    def is_dir(self, key: str) -> bool:
        with translate_os_errors(self.files.url(key), lookup=True):
            try:
                return statmod.S_ISDIR(os.lstat(self.files.path(key)).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return False

    def list_dir(self, key: str) -> list[str]:
        with translate_os_errors(self.files.url(key), lookup=True):
            try:
                return os.listdir(self.files.path(key))
            except (FileNotFoundError, NotADirectoryError):
                return []

    def link_new(self, src_key: str, dst_key: str, *, expect_digest: str) -> bool:
        src, dst = self.files.path(src_key), self.files.path(dst_key)
        url = self.files.url(dst_key)
        # New directories are flushed by the caller's sync_tree, not one by one.
        self.files.ensure_dir(os.path.dirname(dst), url, defer=set())
        if not os.path.lexists(src):
            raise NotFound("link source does not exist", url=self.files.url(src_key))
        with translate_os_errors(url):
            try:
                os.link(src, dst, follow_symlinks=False)
                return False
            except OSError as exc:
                if exc.errno not in LINK_IMPOSSIBLE:
                    raise
                log.info("hard link %s -> %s impossible (%s); copying", src, dst, exc)
        self._copy_verified(src_key, dst_key, expect_digest)
        return True

    def link_many(self, links: Sequence[tuple[str, str]]) -> list[ObjectInfo | None]:
        made: list[ObjectInfo | None] = []
        parents: set[str] = set()  # known to exist
        dst_key = ""
        try:  # one handler for the loop: this runs once per file of a view
            for src_key, dst_key in links:
                src, dst = self.files.path(src_key), self.files.path(dst_key)
                parent = os.path.dirname(dst)
                if parent not in parents:
                    self.files.ensure_dir(parent, self.files.url(dst_key), defer=set())
                    parents.add(parent)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in LINK_IMPOSSIBLE or not os.path.lexists(src):
                        made.append(None)
                        continue
                    raise
                made.append(self.files.info(dst_key, os.lstat(dst)))
        except OSError as exc:
            raise os_error_to_storage(exc, self.files.url(dst_key)) from exc
        return made

    def sync_tree(self, prefix_key: str) -> None:
        path = self.files.path(prefix_key)
        with translate_os_errors(self.files.url(prefix_key), lookup=True):
            if not statmod.S_ISDIR(os.lstat(path).st_mode):
                raise Conflict("not a directory", url=self.files.url(prefix_key))
            for dirpath, _dirs, _files in os.walk(path, topdown=False, onerror=_raise):
                fsync_dir(dirpath)
            fsync_dir(os.path.dirname(path))

    def rename_tree(self, src_key: str, dst_key: str) -> None:
        src, dst = self.files.path(src_key), self.files.path(dst_key)
        url = self.files.url(dst_key)
        with translate_os_errors(self.files.url(src_key), lookup=True):
            if not statmod.S_ISDIR(os.lstat(src).st_mode):
                raise Conflict("not a directory", url=self.files.url(src_key))
        self.files.ensure_dir(os.path.dirname(dst), url)
        with translate_os_errors(url):
            os.rename(src, dst)  # onto a non-empty directory: ENOTEMPTY/EEXIST, a Conflict
            self._sync_parents(src, dst)

    def exchange(self, a_key: str, b_key: str) -> bool:
        a, b = self.files.path(a_key), self.files.path(b_key)
        with translate_os_errors(self.files.url(a_key)):
            if not exchange_paths(a, b):
                return False
            self._sync_parents(a, b)
        return True

    def set_symlink(self, key: str, target: str) -> None:
        if not target or target.startswith("/") or ".." in target.split("/"):
            raise InvalidPath(f"symlink target {target!r} must be relative, without '..'")
        path, url = self.files.path(key), self.files.url(key)
        if self.read_symlink(key) == target:
            return
        self.files.ensure_dir(os.path.dirname(path), url)
        tmp = self.files.new_temp(path)
        with translate_os_errors(url):
            os.symlink(target, tmp)
            try:
                # A non-symlink appearing here since read_symlink looked is replaced (a file)
                # or refused (a directory): a narrow race inside datasync's own namespace.
                os.rename(tmp, path)
            finally:
                unlink_quietly(tmp)
            fsync_dir(os.path.dirname(path))

    def remove_symlink(self, key: str) -> None:
        if self.read_symlink(key) is None:
            return
        path = self.files.path(key)
        with translate_os_errors(self.files.url(key)):
            unlink_quietly(path)
            fsync_dir(os.path.dirname(path))

    def read_symlink(self, key: str) -> str | None:
        path, url = self.files.path(key), self.files.url(key)
        with translate_os_errors(url, lookup=True):
            try:
                return os.readlink(path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno == errno.ENOTDIR:
                    return None  # a parent is a file: no symlink can be there
                if exc.errno == errno.EINVAL:
                    raise Conflict("exists and is not a symlink", url=url) from exc
                raise

    def remove_tree(self, prefix_key: str) -> None:
        path, url = self.files.path(prefix_key), self.files.url(prefix_key)
        with translate_os_errors(url):
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return
            if not statmod.S_ISDIR(mode):
                raise Conflict("not a directory", url=url)
            self._chmod_dirs(path, _DIR_WRITABLE)
            shutil.rmtree(path)
            fsync_dir(os.path.dirname(path))

    def set_tree_readonly(self, prefix_key: str, readonly: bool) -> None:
        path, url = self.files.path(prefix_key), self.files.url(prefix_key)
        with translate_os_errors(url, lookup=True):
            if not statmod.S_ISDIR(os.lstat(path).st_mode):
                raise Conflict("not a directory", url=url)
            self._chmod_dirs(path, _DIR_READONLY if readonly else _DIR_WRITABLE)

    # -- internals ------------------------------------------------------------------------

    def _copy_verified(self, src_key: str, dst_key: str, digest: str) -> None:
        """An independent copy at the new name ``dst_key``, re-hashed before it appears."""
        dst = self.files.path(dst_key)
        sfd, st = self.files.open_regular(src_key)
        url = self.files.url(dst_key)
        tmp = self.files.new_temp(dst)
        try:
            dfd = self.files.create_temp(os.path.dirname(dst), tmp, st.st_size, url)
            try:
                with translate_os_errors(url):
                    copy_fd(sfd, dfd, st.st_size)
                self.files.seal(dfd, url)
            finally:
                os.close(dfd)
            with translate_os_errors(url):
                got, _ = hash_file(tmp, _WHOLE)
                if got != digest:
                    raise ChecksumMismatch(
                        f"copy of {src_key} hashed to {got}, expected {digest}", url=url
                    )
                rename_noreplace(tmp, dst)
        finally:
            os.close(sfd)
            unlink_quietly(tmp)

    @staticmethod
    def _chmod_dirs(top: str, mode: int) -> None:
        # Writable: parents first; read-only: children first. Either way a non-root owner
        # never needs to enter a directory it has just locked.
        writable = mode == _DIR_WRITABLE
        if writable:
            os.chmod(top, mode)
        for dirpath, dirnames, _files in os.walk(top, topdown=writable, onerror=_raise):
            for name in dirnames:
                child = os.path.join(dirpath, name)
                if not os.path.islink(child):
                    os.chmod(child, mode)
        if not writable:
            os.chmod(top, mode)

    def _sync_up(self, directory: str) -> None:
        """fsync ``directory`` and each parent up to and including the root."""
        current = directory
        while True:
            fsync_dir(current)
            if len(current) <= len(self.files.root):
                break
            current = os.path.dirname(current)

    @staticmethod
    def _sync_parents(a: str, b: str) -> None:
        fsync_dir(os.path.dirname(a))
        if os.path.dirname(a) != os.path.dirname(b):
            fsync_dir(os.path.dirname(b))


def _raise(exc: OSError) -> None:
    raise exc
