"""Task kinds and their typed payloads, serialized in one place.

The planner builds these, the state owner stores them in ``tasks.payload`` (JSON) with
``encode``, and the executor gets them back with ``decode``. ``docs/task-states.md`` lists
the same fields (``tests/unit/test_payloads.py`` checks the table against these classes).

Every payload names its destination site; blob payloads carry the source the planner
chose (the executor falls back to other replicas when it fails) and every digest the
worker must check, so a task never needs the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import TypeAdapter

__all__ = [
    "BlobItem",
    "BlobsPayload",
    "ChunkedBlob",
    "ChunksPayload",
    "FinalizePayload",
    "LabelsPayload",
    "Payload",
    "PublishPayload",
    "SourceRef",
    "TaskKind",
    "decode",
    "encode",
    "kind_of",
    "link_of",
]


class TaskKind(StrEnum):
    BLOBS = "blobs"  # a batch of small blobs, each copied whole
    CHUNKS = "chunks"  # a range of chunks of one large blob
    FINALIZE = "finalize"  # commit, re-verify and record one large blob
    PUBLISH = "publish"  # build the placement's view, then its labels
    LABELS = "labels"  # point a dataset's labels at the site at what is published there


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where the planner chose to read a blob: ``site``'s object ``key``, pinned by ``etag``."""

    site: str
    key: str
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class BlobItem:
    digest: str
    size: int
    src: SourceRef


@dataclass(frozen=True, slots=True)
class BlobsPayload:
    dst_site: str
    items: tuple[BlobItem, ...]


@dataclass(frozen=True, slots=True)
class ChunkedBlob:
    """A blob larger than one chunk; ``chunk_digests[i]`` covers bytes
    ``[i * chunk_size, min(size, (i + 1) * chunk_size))``."""

    dst_site: str
    digest: str
    size: int
    chunk_size: int
    chunk_digests: tuple[str, ...]
    src: SourceRef


@dataclass(frozen=True, slots=True)
class ChunksPayload:
    blob: ChunkedBlob
    first: int  # first chunk index of this task
    last: int  # one past its last chunk


@dataclass(frozen=True, slots=True)
class FinalizePayload:
    blob: ChunkedBlob


@dataclass(frozen=True, slots=True)
class PublishPayload:
    placement_id: int
    dst_site: str
    dataset: str
    version_id: str


@dataclass(frozen=True, slots=True)
class LabelsPayload:
    dst_site: str
    dataset: str


Payload = BlobsPayload | ChunksPayload | FinalizePayload | PublishPayload | LabelsPayload

_KINDS: dict[type[Any], TaskKind] = {
    BlobsPayload: TaskKind.BLOBS,
    ChunksPayload: TaskKind.CHUNKS,
    FinalizePayload: TaskKind.FINALIZE,
    PublishPayload: TaskKind.PUBLISH,
    LabelsPayload: TaskKind.LABELS,
}
_ADAPTERS: dict[TaskKind, TypeAdapter[Any]] = {
    kind: TypeAdapter(cls) for cls, kind in _KINDS.items()
}


def kind_of(payload: Payload) -> TaskKind:
    return _KINDS[type(payload)]


def link_of(payload: Payload) -> tuple[str | None, str]:
    """``(source site, destination site)`` of the bytes a task moves (no source: it moves
    none). A batch is filed under its first item's source, the planner's usual choice."""
    match payload:
        case BlobsPayload():
            return (payload.items[0].src.site if payload.items else None), payload.dst_site
        case ChunksPayload() | FinalizePayload():
            return payload.blob.src.site, payload.blob.dst_site
        case PublishPayload() | LabelsPayload():
            return None, payload.dst_site


def encode(payload: Payload) -> dict[str, Any]:
    """The JSON-ready form stored in ``tasks.payload``."""
    data: dict[str, Any] = _ADAPTERS[kind_of(payload)].dump_python(payload, mode="json")
    return data


def decode(kind: str, data: dict[str, Any]) -> Payload:
    """The typed payload of a task row; raises ``ValueError`` for a malformed one."""
    payload: Payload = _ADAPTERS[TaskKind(kind)].validate_python(data)
    return payload
