"""Publish a version's view at a site, atomically, once every blob is a replica there.

A reader never sees a partial version (invariant 3):

* **POSIX** (the backend has a filesystem ``root`` and hard links): the view is built as hard
  links from the site's blob store into ``<dataset>/.staging-<version-id>-<rand>/``, every
  directory is fsynced, then the staging directory is renamed to ``<dataset>/<version-id>``
  (one atomic ``rename``), and the dataset directory is fsynced. Across devices (``EXDEV``),
  at the link limit (``EMLINK``) or where links are refused, the file is copied instead,
  as temp file + fsync, re-read and re-hashed, then renamed inside the staging directory.
  Labels are symlinks ``<dataset>/<label> -> <version-id>``, replaced atomically by
  renaming a temp symlink.
* **Object stores**: each blob is copied server-side (or read and written where the backend
  cannot) to ``<dataset>/<version-id>/<path>``, every copied object is re-read and re-hashed
  (a server-side copy is trusted for nothing), and ``<dataset>/<version-id>/.datasync-complete``
  is written LAST. Readers treat a version prefix without the marker as absent.

Publishing is idempotent: an existing version directory (POSIX: only a completed rename
creates it) or an existing marker means the view is already complete, and only labels are
refreshed. Leftover ``.staging-<version-id>-*`` directories of a killed worker are removed.
Failpoints ``mid_publish`` and ``before_rename`` let the kill tests stop a worker here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from datasync.backends.base import Backend
from datasync.errors import ChecksumMismatch, NoSpace, NotFound, StorageError, TransientError
from datasync.manifest.hashing import hash_file
from datasync.transfer.buffers import BufferPool
from datasync.transfer.failpoints import failpoint
from datasync.transfer.verify import hash_object, posix_root

__all__ = [
    "COMPLETE_MARKER",
    "PublishResult",
    "ViewFile",
    "blob_key",
    "posix_root",
    "publish_view",
    "view_prefix",
]

COMPLETE_MARKER = ".datasync-complete"
_COPY_BLOCK = 8 * 1024 * 1024
_WHOLE = 2**62  # hash_file chunk size beyond any file: whole-file digest only


def blob_key(digest: str) -> str:
    """The blob store key of ``digest`` at every site (docs/transfers.md, "Layout")."""
    hex32 = digest.split(":", 1)[1]
    return f".datasync/blobs/{hex32[0:2]}/{hex32[2:4]}/{hex32}"


def view_prefix(dataset: str, version_id: str) -> str:
    return f"{dataset}/{version_id}"


@dataclass(frozen=True, slots=True)
class ViewFile:
    """One file of the view: its path in the version and where its bytes are at the site."""

    path: str
    digest: str
    size: int
    key: str  # usually blob_key(digest); a registration source keeps the file at its path


@dataclass(frozen=True, slots=True)
class PublishResult:
    location: str  # filesystem path or URL of the version directory
    files: int
    bytes: int
    copied: int  # files copied instead of linked (POSIX) or by read+write (object stores)
    already: bool  # the view was complete before this call


def publish_view(
    backend: Backend,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    *,
    labels: Iterable[str] = (),
    buffers: BufferPool | None = None,
) -> PublishResult:
    """Publish ``dataset/version_id`` from the blobs in ``files()`` (called once or twice:
    it must be re-iterable), then point ``labels`` at it."""
    root = posix_root(backend)
    if root is not None:
        return _publish_posix(root, dataset, version_id, files, labels)
    return _publish_objects(backend, dataset, version_id, files, labels, buffers)


# -- POSIX ----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_atomic(src: Path, dst: Path, digest: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _COPY_BLOCK)
            fout.flush()
            os.fsync(fout.fileno())
        # The copy is new bytes: re-read and re-hash it before it becomes visible.
        got, _ = hash_file(tmp, _WHOLE)
        if got != digest:
            raise ChecksumMismatch(f"view copy hashed to {got}, expected {digest}", url=str(dst))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _link_or_copy(src: Path, dst: Path, digest: str) -> bool:
    """Hard-link ``src`` at ``dst``; copy when linking is impossible. True if copied."""
    try:
        os.link(src, dst)
        return False
    except FileExistsError:
        return False  # a previous pass of this same staging dir made it
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
            raise
    _copy_atomic(src, dst, digest)
    return True


def _clean_staging(dataset_dir: Path, version_id: str) -> None:
    for stale in dataset_dir.glob(f".staging-{version_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _set_label_posix(dataset_dir: Path, label: str, version_id: str) -> None:
    link = dataset_dir / label
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if os.readlink(link) == version_id:
            return
    tmp = link.with_name(f".label-{link.name}-{secrets.token_hex(4)}")
    os.symlink(version_id, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _translate_os(exc: OSError, where: Path) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space to publish the view: {exc.strerror}", url=str(where))
    if exc.errno == errno.ENOENT:
        return TransientError(f"view staging disappeared: {exc}", url=str(where))
    return TransientError(f"cannot publish view: {exc}", url=str(where))


def _publish_posix(
    root: Path,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    labels: Iterable[str],
) -> PublishResult:
    dataset_dir = root / dataset
    final = dataset_dir / version_id
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            # Only the rename below creates it, after the staging dir was complete.
            _clean_staging(dataset_dir, version_id)
            for label in labels:
                _set_label_posix(dataset_dir, label, version_id)
            return PublishResult(str(final), 0, 0, 0, already=True)
        _clean_staging(dataset_dir, version_id)
        staging = dataset_dir / f".staging-{version_id}-{secrets.token_hex(6)}"
        staging.mkdir()
        n = nbytes = copied = 0
        made_dirs: set[Path] = {staging}
        for f in files():
            dst = staging / f.path
            if dst.parent not in made_dirs:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(dst.parent)
            src = root / f.key
            if not src.is_file():
                raise NotFound(f"blob of {f.path} ({f.digest}) missing at {f.key}", url=str(src))
            copied += _link_or_copy(src, dst, f.digest)
            n += 1
            nbytes += f.size
            if n == 1:
                failpoint("mid_publish")
        for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        failpoint("before_rename")
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                # A concurrent (zombie) publisher won the race: its view is complete.
                shutil.rmtree(staging, ignore_errors=True)
                return PublishResult(str(final), n, nbytes, copied, already=True)
            raise
        _fsync_dir(dataset_dir)
        for label in labels:
            _set_label_posix(dataset_dir, label, version_id)
        _fsync_dir(dataset_dir)
        return PublishResult(str(final), n, nbytes, copied, already=False)
    except OSError as exc:
        raise _translate_os(exc, final) from exc


# -- object stores --------------------------------------------------------------------------


def _put_small(backend: Backend, key: str, data: bytes) -> None:
    writer = backend.begin(key, len(data), max(len(data), 1))
    if data:
        writer.put_part(0, data)
    writer.commit()


def _copy_by_stream(
    backend: Backend, src: str, dst: str, size: int, buffers: BufferPool | None
) -> None:
    part = max(backend.capabilities.min_part_size, 8 * 1024 * 1024)
    writer = backend.begin(dst, size, part)
    try:
        for i, off in enumerate(range(0, size, part)):
            writer.put_part(i, backend.read_range(src, off, min(part, size - off)))
        writer.commit()
    except BaseException:
        with contextlib.suppress(StorageError):
            writer.abort()
        raise


def _verify_object(backend: Backend, key: str, f: ViewFile, buffers: BufferPool | None) -> bool:
    try:
        info = backend.stat(key)
    except NotFound:
        return False
    if info.size != f.size:
        return False
    return hash_object(backend, key, f.size, buffers=buffers) == f.digest


def _publish_objects(
    backend: Backend,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    labels: Iterable[str],
    buffers: BufferPool | None,
) -> PublishResult:
    prefix = view_prefix(dataset, version_id)
    marker = f"{prefix}/{COMPLETE_MARKER}"
    with contextlib.suppress(NotFound):
        backend.stat(marker)
        _set_labels_objects(backend, dataset, version_id, labels)
        return PublishResult(f"{backend.url}/{prefix}", 0, 0, 0, already=True)
    n = nbytes = copied = 0
    for f in files():
        dst = f"{prefix}/{f.path}"
        # A killed publisher may have left it: it still has to pass the re-read below.
        if not _verify_object(backend, dst, f, buffers):
            if backend.capabilities.server_side_copy:
                backend.copy(f.key, dst)
            else:
                _copy_by_stream(backend, f.key, dst, f.size, buffers)
                copied += 1
            if not _verify_object(backend, dst, f, buffers):
                backend.delete(dst)
                raise ChecksumMismatch(
                    f"{dataset}@{version_id}: view copy of {f.path} does not hash to {f.digest}",
                    url=f"{backend.url}/{dst}",
                )
        n += 1
        nbytes += f.size
        if n == 1:
            failpoint("mid_publish")
    failpoint("before_rename")
    body = json.dumps(
        {
            "dataset": dataset,
            "version_id": version_id,
            "files": n,
            "bytes": nbytes,
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        sort_keys=True,
    ).encode()
    _put_small(backend, marker, body)
    _set_labels_objects(backend, dataset, version_id, labels)
    return PublishResult(f"{backend.url}/{prefix}", n, nbytes, copied, already=False)


def _set_labels_objects(
    backend: Backend, dataset: str, version_id: str, labels: Iterable[str]
) -> None:
    # Object stores have no symlinks: a label is a small object naming the version id.
    for label in labels:
        _put_small(backend, f"{dataset}/.labels/{label}", version_id.encode())
