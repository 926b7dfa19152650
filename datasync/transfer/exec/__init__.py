"""Execute claimed tasks: one runner per task kind, over one shared ``ExecContext``.

``blobs.py`` (batches of small blobs), ``chunked.py`` (chunks and finalize of large
blobs), ``publish.py`` (views); ``reader.py`` holds the verified read every byte goes
through, ``context.py`` what the runners share.

Invariants: no byte is written before its digest (chunk or whole) matched the manifest,
and no replica is recorded before the stored object was re-read and matched (invariant
2). Every task is idempotent (invariant 5).
"""

from __future__ import annotations

import threading

from datasync.errors import DatasyncError
from datasync.transfer.exec.blobs import run_blobs
from datasync.transfer.exec.chunked import run_chunks, run_finalize
from datasync.transfer.exec.context import ExecContext, LeaseLost, ReplanNeeded, SiteBackends
from datasync.transfer.exec.publish import run_labels, run_publish
from datasync.transfer.payloads import (
    BlobsPayload,
    ChunksPayload,
    FinalizePayload,
    LabelsPayload,
    PublishPayload,
    decode,
)
from datasync.transfer.state import ClaimedTask

__all__ = [
    "ExecContext",
    "Executor",
    "LeaseLost",
    "MalformedTask",
    "ReplanNeeded",
    "SiteBackends",
]


class MalformedTask(DatasyncError):
    """A task row whose payload does not decode: a bug or a corrupted row; never retried."""


class Executor:
    """Runs claimed tasks. Thread-safe; one per worker process."""

    def __init__(self, ctx: ExecContext) -> None:
        self.ctx = ctx

    def execute(self, task: ClaimedTask, cancel: threading.Event | None = None) -> int:
        """Run ``task``; return the bytes written at the destination (0 for a no-op)."""
        cancel = cancel or threading.Event()
        try:
            p = decode(task.kind, task.payload)
        except ValueError as exc:
            raise MalformedTask(f"task {task.id} ({task.kind}): malformed payload: {exc}") from exc
        match p:
            case BlobsPayload():
                return run_blobs(self.ctx, p, task.attempts, cancel)
            case ChunksPayload():
                return run_chunks(self.ctx, p, cancel)
            case FinalizePayload():
                return run_finalize(self.ctx, p, task, cancel)
            case PublishPayload():
                run_publish(self.ctx, p, task)
                return 0
            case LabelsPayload():
                run_labels(self.ctx, p, task)
                return 0
