"""The ``publish`` and ``labels`` tasks: a placement's view from the site's blob store, and
the dataset's labels at the site.

It runs when every other task of the placement is done, in two passes over the manifest:

1. Check every blob the view will use: its blob-store replica at the site exists, has its
   size, and still carries the version token (ETag, POSIX ``mtime-ino-size``) recorded
   when it was verified; a changed token means the object was rewritten, so it is
   re-hashed (a mere ``touch`` passes and the token is refreshed). Blobs that are missing
   or hash wrong are marked bad and the placement is re-planned (``ReplanNeeded``): a
   store that lost or damaged acknowledged bytes heals instead of failing forever.
2. Hand the files to ``datasync.transfer.views``, which builds the view atomically, then
   point the dataset's labels at the site at what is published there. Only blob-store
   replicas are ever used: bytes datasync wrote and verified. A blob found damaged while
   copying (object stores) is handled as in step 1. When the publish fails for good, an
   object-store view left without its completion marker is deleted.

The queue's ``complete`` then makes the placement READY. A version registered from a
producer manifest (unverified) is marked verified after its first publish, since every
blob was just checked against its digests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlmodel import col

from datasync.db.transfer_tables import Placement
from datasync.errors import Conflict, DatasyncError, NotFound, TransientError
from datasync.models import PlacementState
from datasync.transfer.exec.context import ExecContext, ReplanNeeded
from datasync.transfer.failpoints import failpoint
from datasync.transfer.labels import labels_at_site
from datasync.transfer.payloads import LabelsPayload, PublishPayload
from datasync.transfer.readback import hash_object
from datasync.transfer.siteindex import BlobRow
from datasync.transfer.state import ClaimedTask, ReplicaRow
from datasync.transfer.views import (
    BlobDamaged,
    PublishResult,
    ViewFile,
    publish_view,
    remove_unmarked_view,
    sync_labels,
)

__all__ = ["run_labels", "run_publish"]

_BATCH = 500


def run_labels(ctx: ExecContext, payload: LabelsPayload, task: ClaimedTask) -> None:
    """Make the dataset's labels at the site agree with the database.

    A publish files this task when a label met something a user made; workers are woken at
    once, so it can be claimed before that publish's completion commits. Run then, the new
    version would not count as published and its labels would be removed again: it waits
    (retryable) until its placement is no longer PUBLISHING."""
    with ctx.state.engine.connect() as conn:
        state = conn.execute(
            sa.select(col(Placement.state)).where(col(Placement.id) == task.placement_id)
        ).scalar_one_or_none()
    if state == PlacementState.PUBLISHING:
        raise TransientError(
            f"placement #{task.placement_id} is still publishing: its labels wait for it"
        )
    labels = labels_at_site(ctx.state.engine, payload.dataset, payload.dst_site)
    sync_labels(ctx.backends[payload.dst_site], payload.dataset, labels)


def run_publish(ctx: ExecContext, payload: PublishPayload, task: ClaimedTask) -> PublishResult:
    """Build the view of the payload's version at its site, then its labels (idempotent)."""
    try:
        return _publish(ctx, payload)
    except BlobDamaged as exc:
        ctx.state.replicas.mark_bad(
            payload.dst_site, exc.digest, exc.key, f"found at publish: {exc.why}"
        )
        raise ReplanNeeded(f"{payload.dataset}@{payload.version_id[:12]}: {exc}") from exc
    except DatasyncError as exc:
        final = not exc.retryable or task.attempts >= task.max_attempts
        if final and not isinstance(exc, ReplanNeeded):
            # Nothing half-written stays behind a failed placement (object stores).
            with contextlib.suppress(DatasyncError):
                backend = ctx.backends[payload.dst_site]
                if not backend.capabilities.local_tree:
                    remove_unmarked_view(backend, payload.dataset, payload.version_id)
        raise


def _publish(ctx: ExecContext, payload: PublishPayload) -> PublishResult:
    site = payload.dst_site
    version = ctx.manifests.resolve(f"{payload.dataset}@{payload.version_id}")
    backend = ctx.backends[site]

    def batches() -> Iterator[tuple[list[tuple[str, str, int]], dict[str, BlobRow]]]:
        batch: list[tuple[str, str, int]] = []
        for entry in ctx.manifests.iter_entries(version):
            batch.append((entry.path, entry.digest, entry.size))
            if len(batch) >= _BATCH:
                yield batch, ctx.index.blobs(site, sorted({d for _, d, _ in batch}))
                batch = []
        if batch:
            yield batch, ctx.index.blobs(site, sorted({d for _, d, _ in batch}))

    damaged: list[str] = []
    for batch, rows in batches():
        damaged += _check_blobs(ctx, site, batch, rows)
    if damaged:
        raise ReplanNeeded(
            f"{payload.dataset}@{payload.version_id[:12]} at {site}: {len(damaged)} blob(s)"
            f" missing or damaged in the blob store (first: {damaged[0]}); moving them again"
        )

    def files() -> Iterator[ViewFile]:
        for batch, rows in batches():
            for path, digest, size in batch:
                row = rows.get(digest)
                if row is None:  # recorded bad since the check: the next attempt re-plans
                    raise NotFound(f"cannot publish: blob {digest} of {path} is not at {site}")
                yield ViewFile(path, digest, size, row.key)

    result = publish_view(
        backend, payload.dataset, payload.version_id, files, io=ctx.io, buffers=ctx.buffers
    )
    labels = labels_at_site(ctx.state.engine, payload.dataset, site, publishing=payload.version_id)
    try:
        sync_labels(backend, payload.dataset, labels)
    except Conflict:
        # The view is complete: a label in the way of something a user made must not fail
        # it. A labels task of its own keeps the refusal, with the reason, in the errors.
        ctx.state.tasks.enqueue(payload.placement_id, LabelsPayload(site, payload.dataset))
    failpoint("after_publish")
    if not version.verified:
        ctx.manifests.mark_verified(version)
    return result


def _check_blobs(
    ctx: ExecContext, site: str, batch: list[tuple[str, str, int]], rows: dict[str, BlobRow]
) -> list[str]:
    """Problems of this batch's blobs (``path: why``); damaged replicas are marked bad."""
    paths: dict[str, str] = {}
    for path, digest, _size in batch:
        paths.setdefault(digest, path)
    backend = ctx.backends[site]

    def check(digest: str) -> str | None:
        row = rows.get(digest)
        if row is None:
            return "not in the site's blob store"
        try:
            info = backend.stat(row.key)
        except NotFound:
            return f"{row.key} is missing"
        if info.size != row.size:
            return f"{row.key} holds {info.size} bytes, not {row.size}"
        if row.etag is None or info.etag == row.etag:
            return None
        got = hash_object(backend, row.key, row.size, buffers=ctx.buffers)
        if got != digest:
            return f"{row.key} was rewritten: it hashes to {got}"
        ctx.state.replicas.record(site, [ReplicaRow(digest, row.size, row.key, info.etag)])
        return None

    problems = []
    for digest, why in zip(paths, ctx.io.map(check, list(paths)), strict=True):
        if why is None:
            continue
        row = rows.get(digest)
        if row is not None:
            ctx.state.replicas.mark_bad(site, digest, row.key, f"found at publish: {why}")
        problems.append(f"{paths[digest]} ({digest}): {why}")
    return problems
