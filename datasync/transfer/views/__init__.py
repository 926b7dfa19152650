"""Views: a version published at a site, all or nothing, built only from its blob store.

``publish_view`` picks the builder by what the backend can do: hard links and an atomic
rename (``posix``, backends with ``SupportsLocalTree``) or server-side copies with a
completion marker written last (``objects``). ``sync_labels`` points the dataset's labels
at what is published (``labels``). The site layout is in ``datasync.transfer.layout``.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable

from datasync.backends.base import Backend, SupportsLocalTree
from datasync.transfer.buffers import BufferPool
from datasync.transfer.layout import view_prefix
from datasync.transfer.views.labels import sync_labels
from datasync.transfer.views.model import (
    BlobCheck,
    BlobDamaged,
    BlobsDamaged,
    PublishResult,
    ViewFile,
)
from datasync.transfer.views.objects import is_marked, publish_objects, remove_unmarked_view
from datasync.transfer.views.posix import publish_posix

__all__ = [
    "BlobCheck",
    "BlobDamaged",
    "BlobsDamaged",
    "PublishResult",
    "ViewFile",
    "publish_view",
    "remove_unmarked_view",
    "sync_labels",
    "view_present",
]


def view_present(backend: Backend, dataset: str, version_id: str) -> bool:
    """Is the view there at all (one stat; ``verify`` checks what is in it)?"""
    prefix = view_prefix(dataset, version_id)
    if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
        return backend.is_dir(prefix)
    return is_marked(backend, prefix)


def publish_view(
    backend: Backend,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    *,
    io: cf.Executor,
    buffers: BufferPool | None = None,
    check: BlobCheck | None = None,
) -> PublishResult:
    """Publish ``dataset/version_id`` from the blobs in ``files()`` (called at most once
    per attempt). POSIX hands ``check`` each file whose linked blob does not show its
    recorded token; object stores re-hash every copy instead."""
    if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
        return publish_posix(backend, dataset, version_id, files, check)
    return publish_objects(backend, dataset, version_id, files, io=io, buffers=buffers)
