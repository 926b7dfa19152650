"""Labels at a site: ``<dataset>@<label>`` names the version the label points at, or is
absent when that version is not published there.

``sync_labels`` makes a site agree with the database for one dataset, atomically per
label: a symlink swap on POSIX, one object PUT on object stores. A label whose version
is not published at the site is removed, so a job reading ``.../drive/x@prod`` never
trains on the version ``prod`` pointed at before it moved. Only what datasync created is
ever replaced or removed (its form says so, ``layout``); anything else in the way is a
``Conflict`` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

from datasync.backends.base import Backend, SupportsLocalTree
from datasync.errors import Conflict, NotFound
from datasync.transfer.layout import (
    is_label_body,
    label_body,
    label_key,
    label_target,
    label_version,
)
from datasync.transfer.views.objects import put_small

__all__ = ["sync_labels"]

_MAX_LABEL_OBJECT = 4096


def sync_labels(backend: Backend, dataset: str, labels: Mapping[str, str | None]) -> None:
    """Point each ``label`` at its version id, or remove it where the value is None.

    Every label that can be set is; then one ``Conflict`` names those that could not."""
    tree = backend if backend.capabilities.local_tree else None
    refused: list[str] = []
    for label, version_id in sorted(labels.items()):
        key = label_key(dataset, label)
        try:
            if isinstance(tree, SupportsLocalTree):
                _posix(tree, dataset, key, version_id)
            else:
                _object(backend, dataset, label, key, version_id)
        except Conflict as exc:
            refused.append(str(exc))
    if refused:
        raise Conflict("; ".join(refused))


def _posix(tree: SupportsLocalTree, dataset: str, key: str, version_id: str | None) -> None:
    try:
        current = tree.read_symlink(key)
    except Conflict as exc:  # a file or directory someone made
        raise Conflict(f"{key} was not made by datasync; not replacing it ({exc})") from exc
    if current is not None and label_version(dataset, current) is None:
        raise Conflict(f"symlink {key} -> {current} was not made by datasync; not replacing it")
    if version_id is not None:
        tree.set_symlink(key, label_target(dataset, version_id))
    elif current is not None:
        tree.remove_symlink(key)


def _object(backend: Backend, dataset: str, label: str, key: str, version_id: str | None) -> None:
    try:
        info = backend.stat(key)
    except NotFound:
        info = None
    if info is not None:
        body = (
            backend.read_range(key, 0, _MAX_LABEL_OBJECT) if info.size <= _MAX_LABEL_OBJECT else b""
        )
        if not is_label_body(body):
            raise Conflict(f"object {key} was not made by datasync; not replacing it")
    if version_id is not None:
        put_small(backend, key, label_body(dataset, label, version_id))
    elif info is not None:
        backend.delete(key)
