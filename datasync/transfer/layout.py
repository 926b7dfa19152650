"""Where things are at every site: the blob store, views, labels, markers and staging names.

Keys are relative to the site's root (``docs/transfers.md``, "Layout at every site"):

* blob store: ``.datasync/blobs/<hex[0:2]>/<hex[2:4]>/<hex32>``, written and verified by
  datasync only, read-only on POSIX;
* a view: ``<dataset>/<version-id>/<path>``;
* a label: ``<dataset>@<label>``, a symlink to ``<leaf>/<version-id>`` on POSIX (``leaf``:
  the dataset name's last segment) and a small JSON object on object stores.

Names never collide: a dataset segment holds neither ``@`` nor a leading ``.`` and is never
64 hex characters (``manifest.refs``), so no dataset can be a label, a version directory,
staging or the blob store. datasync recognises what it created by its form (a label
symlink's target, a label object's JSON key), and never replaces anything else.
"""

from __future__ import annotations

import json
import re

__all__ = [
    "BLOB_PREFIX",
    "COMPLETE_MARKER",
    "blob_key",
    "is_label_body",
    "label_body",
    "label_key",
    "label_target",
    "label_version",
    "staging_prefix",
    "view_prefix",
]

BLOB_PREFIX = ".datasync/blobs/"
COMPLETE_MARKER = ".datasync-complete"
_LABEL_FIELD = "datasync_label"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def blob_key(digest: str) -> str:
    """The blob store key of ``digest`` at every site."""
    hex32 = digest.split(":", 1)[1]
    return f"{BLOB_PREFIX}{hex32[0:2]}/{hex32[2:4]}/{hex32}"


def view_prefix(dataset: str, version_id: str) -> str:
    return f"{dataset}/{version_id}"


def staging_prefix(dataset: str, version_id: str) -> str:
    """Start of the names of a POSIX view's staging directories (a random tail follows)."""
    return f"{dataset}/.staging-{version_id}-"


def label_key(dataset: str, label: str) -> str:
    return f"{dataset}@{label}"


def label_target(dataset: str, version_id: str) -> str:
    """A POSIX label symlink's target, relative to the directory holding the link."""
    return f"{dataset.rsplit('/', 1)[-1]}/{version_id}"


def label_version(dataset: str, target: str) -> str | None:
    """The version id a label symlink target names, or None if datasync did not make it."""
    leaf, _, version_id = target.partition("/")
    if leaf != dataset.rsplit("/", 1)[-1] or not _HEX64.match(version_id):
        return None
    return version_id


def label_body(dataset: str, label: str, version_id: str) -> bytes:
    """An object-store label: JSON naming the version (and marking it as datasync's)."""
    doc = {_LABEL_FIELD: label, "dataset": dataset, "version_id": version_id}
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def is_label_body(data: bytes) -> bool:
    """True for an object datasync wrote as a label (anything else is never replaced)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and _LABEL_FIELD in doc
