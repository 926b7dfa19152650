"""``PosixBackend``: the ``Backend`` protocol over files under an existing root directory
(invariants in the package docstring). Local-tree operations come from ``tree.py``,
writers from ``writer.py``; both work through the shared ``PosixFiles``."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import stat as statmod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult

from datasync.backends.base import Capabilities, ObjectInfo, SmallPut, check_key
from datasync.backends.posix.files import PosixFiles
from datasync.backends.posix.io import (
    DIRECT_ALIGN,
    DIRECT_TYPES,
    GROUP_SYNC_MODES,
    SYNCFS_TYPES,
    TEMP_RE,
    check_range,
    copy_fd,
    fsync_dir,
    is_temp_name,
    open_direct,
    option_bool,
    pread_direct,
    translate_os_errors,
    unlink_quietly,
)
from datasync.backends.posix.lustre import DEFAULT_LARGE_LAYOUT, fs_type, stripe_policy
from datasync.backends.posix.tree import LINK_IMPOSSIBLE, LocalTreeOps
from datasync.backends.posix.writer import PosixGroupCommit, PosixWriter, open_writer, put_small
from datasync.errors import ConfigError, NotFound, SourceChanged
from datasync.manifest.hashing import ChunkedHasher, hash_file

__all__ = ["PosixBackend"]

log = logging.getLogger(__name__)
_WHOLE = 2**62  # a chunk size no file reaches: the hashers then give the whole-file digest

_OPTIONS = frozenset(
    {
        "lustre",
        "stripe_small_count",
        "large_threshold_bytes",
        "large_layout",
        "preallocate",
        "lfs_command",
        "group_sync",
        "writeback_min_bytes",
        "direct_io",
        "file_mode",
    }
)


class PosixBackend(LocalTreeOps):
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
        direct_io: bool | str = "auto",
        file_mode: int = 0o444,
    ) -> None:
        root = os.path.abspath(os.fspath(root))
        if group_sync not in GROUP_SYNC_MODES:
            raise ValueError(f"group_sync must be one of {', '.join(GROUP_SYNC_MODES)}")
        kind = fs_type(root, mountinfo) if "auto" in (group_sync, direct_io) else None
        if group_sync == "auto":
            group_sync = "syncfs" if kind in SYNCFS_TYPES else "fsync"
        direct = (
            kind in DIRECT_TYPES if direct_io == "auto" else option_bool(direct_io, "direct_io")
        )
        if not 0 <= file_mode <= 0o777:
            raise ValueError(f"file_mode must be a permission mode, got {file_mode:o}")
        striping = stripe_policy(
            root,
            lustre=lustre,
            stripe_small_count=stripe_small_count,
            large_threshold_bytes=large_threshold_bytes,
            large_layout=large_layout,
            lfs_command=lfs_command,
            mountinfo=mountinfo,
        )
        self.files = PosixFiles(
            root,
            file_mode=file_mode,
            preallocate=preallocate,
            striping=striping,
            group_sync=group_sync,
            # Parts smaller than this are left to the commit's fsync (no early write-back).
            writeback_min_bytes=writeback_min_bytes,
            direct_io=direct,
        )

    @classmethod
    def from_url(cls, url: SplitResult, options: Mapping[str, Any]) -> PosixBackend:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown posix backend option(s): {', '.join(sorted(unknown))}")
        kwargs = dict(options)
        if not url.path:
            raise ConfigError("posix URL needs a path")
        try:
            if "preallocate" in kwargs:
                kwargs["preallocate"] = option_bool(kwargs["preallocate"], "preallocate")
            if "writeback_min_bytes" in kwargs:
                kwargs["writeback_min_bytes"] = int(kwargs["writeback_min_bytes"])
            if isinstance(kwargs.get("file_mode"), str):  # "0444" or "0o444" in TOML
                kwargs["file_mode"] = int(kwargs["file_mode"].removeprefix("0o"), 8)
            return cls(url.path, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad posix backend option for {url.path}: {exc}") from exc

    # -- protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.files.root

    @property
    def group_sync(self) -> str:
        return self.files.group_sync

    def reads_direct(self, size: int) -> bool:
        """Does ``digest`` read a file of ``size`` bytes with direct I/O (given a buffer)?
        Exactly when its parts were written that way: a file too small for that is read
        through the page cache, where its bytes still are."""
        return self.files.direct_io and size >= self.files.writeback_min_bytes

    def digest(self, key: str, buf: memoryview | None = None) -> str:
        """The xxh3-128 digest of the whole file at ``key``, read back to verify a commit.

        Where ``reads_direct`` and ``buf`` is page-aligned (a pool buffer), the bytes come
        from the device with ``O_DIRECT``, ``len(buf)`` at a time: what a later reader
        gets, not a copy in the page cache (and nothing is copied into it). Otherwise, or
        if the file system refuses, ``hash_file`` reads it through the page cache."""
        path, url = self.files.path(key), self.files.url(key)
        with translate_os_errors(url):
            if buf is not None and len(buf) >= DIRECT_ALIGN and self.files.direct_io:
                got = _hash_direct(path, buf, self.files.writeback_min_bytes)
                if got is not None:
                    return got
            return hash_file(path, _WHOLE)[0]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            server_side_copy=True,
            atomic_rename=True,
            hard_links=True,
            conditional_read=True,
            lists_parts=False,
            lustre_striping=self.files.striping is not None,
            group_commit=True,
            local_tree=True,
            small_puts=True,
        )

    def stat(self, key: str) -> ObjectInfo:
        path, url = self.files.path(key), self.files.url(key)
        with translate_os_errors(url, lookup=True):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = os.stat(self.files.unnormalized_path(key))
        if not statmod.S_ISREG(st.st_mode):
            raise NotFound("not a regular file", url=url)
        return self.files.info(key, st)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        head, _, _ = prefix.rpartition("/")
        with translate_os_errors(self.files.url(prefix), lookup=True):
            self.files.check_root()
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
        return open_writer(self.files, key, size, part_size, token)

    def group_commit(self) -> PosixGroupCommit:
        """A group of new small objects made durable together (see the package docstring)."""
        return PosixGroupCommit(self.files)

    def put_small(
        self, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> builtins.list[SmallPut | Exception]:
        """Many small objects written, committed together and read back (``put_small``)."""
        return put_small(self.files, items)

    def delete(self, key: str) -> None:
        path = self.files.path(key)
        with translate_os_errors(self.files.url(key), lookup=True):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            fsync_dir(os.path.dirname(path))

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        """An independent copy (copy_file_range: a reflink on file systems that have them,
        never a hard link), published atomically like a commit."""
        dst = self.files.path(dst_key)
        url = self.files.url(dst_key)
        sfd, st = self.files.open_regular(src_key)
        try:
            self._check_etag(src_key, st, source.etag if source is not None else None)
            tmp = self.files.new_temp(dst)
            dfd = self.files.create_temp(os.path.dirname(dst), tmp, st.st_size, url)
            try:
                with translate_os_errors(url):
                    copy_fd(sfd, dfd, st.st_size)
                self.files.seal(dfd, url)
            except BaseException:
                unlink_quietly(tmp)
                raise
            finally:
                os.close(dfd)
            return self.files.publish(dst_key, tmp, dst)
        finally:
            os.close(sfd)

    def rename(self, src_key: str, dst_key: str) -> ObjectInfo:
        src, dst = self.files.path(src_key), self.files.path(dst_key)
        self.files.ensure_dir(os.path.dirname(dst), self.files.url(dst_key))
        with translate_os_errors(self.files.url(src_key)):
            os.rename(src, dst)
            self._sync_parents(src, dst)
        return self.stat(dst_key)

    def link(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Hard-link ``dst`` to ``src`` (atomically replacing ``dst``); copy instead across
        devices, at the link limit, or where the file system has no hard links."""
        src, dst = self.files.path(src_key), self.files.path(dst_key)
        self.files.ensure_dir(os.path.dirname(dst), self.files.url(dst_key))
        tmp = self.files.new_temp(dst)
        with translate_os_errors(self.files.url(src_key)):
            try:
                os.link(src, tmp, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in LINK_IMPOSSIBLE:
                    log.info("hard link %s -> %s impossible (%s); copying", src, dst, exc)
                    return self.copy(src_key, dst_key)
                raise
        return self.files.publish(dst_key, tmp, dst)

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

    @contextlib.contextmanager
    def _open_for_read(self, key: str, etag: str | None) -> Iterator[tuple[int, int]]:
        """An open fd and its size; checks ``etag`` before and after the caller reads."""
        fd, st = self.files.open_regular(key)
        try:
            self._check_etag(key, st, etag)
            yield fd, st.st_size
            # A write while we read moves mtime: catch it rather than return a mix.
            with translate_os_errors(self.files.url(key)):
                st = os.fstat(fd)
            self._check_etag(key, st, etag)
        finally:
            os.close(fd)

    def _check_etag(self, key: str, st: os.stat_result, etag: str | None) -> None:
        current = self.files.info(key, st).etag
        if etag is not None and current != etag:
            raise SourceChanged(
                f"file changed (etag {current}, expected {etag})", url=self.files.url(key)
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
                yield self.files.info(key, st)


def _hash_direct(path: str, buf: memoryview, min_bytes: int) -> str | None:
    """The digest of the file at ``path`` read with ``O_DIRECT`` into ``buf``; None when
    it is smaller than ``min_bytes`` or direct reads are refused (the caller reads it
    buffered). A short read ends the digest early, so it cannot match the manifest."""
    fd = open_direct(path, os.O_RDONLY | os.O_NONBLOCK)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file: {path}")
        if st.st_size < min_bytes:
            return None
        hasher = ChunkedHasher(_WHOLE)
        offset = 0
        while (n := pread_direct(fd, buf, offset)) != 0:
            if n is None:
                if offset:
                    raise OSError(f"direct read of {path} refused at byte {offset}")
                return None
            hasher.update(buf[:n])
            offset += n
            if n % DIRECT_ALIGN:
                break  # end of file (an unaligned offset cannot be read direct)
        return hasher.result().digest
    finally:
        os.close(fd)
