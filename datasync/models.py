"""Pure domain values. No I/O, no database, no SDKs.

A ``FileEntry`` is one line of a manifest; a ``Digest`` is ``xxh3-128:<32 lowercase hex>``.
Paths are already normalized (see ``datasync.manifest.paths``) when they reach these types.
The state enums name every state a placement, task or replica row can hold; only
``datasync.transfer.state`` moves a row from one to another (``docs/task-states.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from datasync.errors import InvalidManifest

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_ALGORITHM",
    "MAX_CHUNK_SIZE",
    "MAX_FILE_SIZE",
    "MIN_CHUNK_SIZE",
    "FileEntry",
    "ManifestHeader",
    "PlacementState",
    "ReplicaKind",
    "ReplicaState",
    "TaskState",
    "VersionSummary",
    "check_digest",
    "chunk_count",
]

DIGEST_ALGORITHM = "xxh3-128"
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
MIN_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024 * 1024
# 5 TiB: the largest object S3, Azure block blobs and GCS all accept. Larger is "absurd".
MAX_FILE_SIZE = 5 * 1024**4

_DIGEST_RE = re.compile(r"^xxh3-128:[0-9a-f]{32}$")


def check_digest(value: str) -> str:
    """Return ``value`` if it is a well-formed digest, else raise ``InvalidManifest``."""
    # fullmatch: with match(), "$" also accepts a trailing "\n".
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise InvalidManifest(
            f"bad digest {value!r}: expected '{DIGEST_ALGORITHM}:' "
            "followed by 32 lowercase hex digits"
        )
    return value


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks a file of ``size`` bytes has; files <= chunk_size have no chunk list."""
    return 0 if size <= chunk_size else -(-size // chunk_size)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a version: normalized relative path, size, digest, per-chunk digests.

    ``chunks`` is empty unless ``size > chunk_size``; then it has ``chunk_count`` digests,
    chunk i covering bytes ``[i*chunk_size, min(size, (i+1)*chunk_size))``.
    """

    path: str
    size: int
    digest: str
    chunks: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ManifestHeader:
    """Version-wide facts that are part of the canonical bytes."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    format: str = "datasync-manifest/1"


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """What callers see of a sealed version."""

    dataset: str
    version_id: str
    files: int
    bytes: int
    chunk_size: int
    created_at: str
    labels: tuple[str, ...] = ()
    verified: bool = True


class PlacementState(StrEnum):
    """Where "version V at site S" stands (diagram in ``docs/task-states.md``)."""

    PLANNING = "PLANNING"
    TRANSFERRING = "TRANSFERRING"
    PUBLISHING = "PUBLISHING"
    READY = "READY"
    FAILED = "FAILED"
    # The view was found damaged (by verify or publish); not READY until repaired.
    DAMAGED = "DAMAGED"
    # Unpublished and its unshared blobs deleted to make room (``gc``); replicate brings it back.
    EVICTED = "EVICTED"

    @property
    def final(self) -> bool:
        """No worker will move it on by itself."""
        return self in (
            PlacementState.READY,
            PlacementState.FAILED,
            PlacementState.DAMAGED,
            PlacementState.EVICTED,
        )


class TaskState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class ReplicaState(StrEnum):
    OK = "ok"  # verified bytes (as far as anyone knows)
    BAD = "bad"  # found wrong or missing; ``reason`` says how, re-checked after a back-off


class ReplicaKind(StrEnum):
    """Whose bytes a replica row names.

    ``blob``: the site's blob store (``.datasync/blobs/..``), written and verified by
    datasync, read-only: the only bytes a view is ever built from. ``source``: a file or
    object at a registration source, owned by users and mutable: read (and hashed) as a
    transfer source, never linked or copied into a view.
    """

    BLOB = "blob"
    SOURCE = "source"
