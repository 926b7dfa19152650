"""The ``publish`` and ``labels`` tasks: a placement's view from the site's blob store, and
the dataset's labels at the site.

It runs when every other task of the placement is done:

1. Every file of the version must have an ok replica in the site's blob store; else
   (one was marked bad since planning) the placement is re-planned (``ReplanNeeded``).
2. Every blob the view uses must still be what was verified: its stored object has its
   size and still carries the version token (ETag, POSIX ``mtime-ino-size``) recorded
   when it was verified; a changed token means the object was rewritten, so it is
   re-hashed (a mere ``touch`` passes and, on POSIX, the token is refreshed; on object
   stores ``verify`` refreshes it). POSIX checks each
   link as it is made, on what the link shows (the blob's inode). On object stores the
   view's copy is the check: each copy is re-hashed, and a copy that hashes wrong has
   its blob re-hashed (no stat of every blob first, which cost a request per file).
   Blobs that are missing or hash wrong are marked bad, all of them in one pass, and
   the placement is re-planned: a store that lost or damaged acknowledged bytes heals
   instead of failing forever.
3. ``datasync.transfer.views`` builds the view atomically from the files streamed in
   batches (entries and their blob rows, no per-file query), then the dataset's labels
   at the site are pointed at what is published there. Only blob-store replicas are ever
   used: bytes datasync wrote and verified. When the publish fails for good, an object-store
   view left without its completion marker is deleted.

The queue's ``complete`` then makes the placement READY. A version registered from a
producer manifest (unverified) is marked verified after its first publish, since every
blob was just checked against its digests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlmodel import col

from datasync.backends.base import ObjectInfo
from datasync.db.transfer_tables import Placement
from datasync.errors import Conflict, DatasyncError, NotFound, TransientError
from datasync.models import PlacementState
from datasync.transfer.exec.context import ExecContext, ReplanNeeded
from datasync.transfer.failpoints import failpoint
from datasync.transfer.labels import labels_at_site
from datasync.transfer.payloads import LabelsPayload, PublishPayload
from datasync.transfer.readback import hash_object
from datasync.transfer.state import ClaimedTask, ReplicaRow
from datasync.transfer.views import (
    BlobDamaged,
    BlobsDamaged,
    PublishResult,
    ViewFile,
    publish_view,
    remove_unmarked_view,
    sync_labels,
)

__all__ = ["run_labels", "run_publish"]


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
    except (BlobDamaged, BlobsDamaged) as exc:
        damaged = exc.damaged if isinstance(exc, BlobsDamaged) else (exc,)
        for blob in damaged:
            ctx.state.replicas.mark_bad(
                payload.dst_site, blob.digest, blob.key, f"found at publish: {blob.why}"
            )
        raise ReplanNeeded(
            f"{payload.dataset}@{payload.version_id[:12]} at {payload.dst_site}: {exc};"
            " moving what is damaged again"
        ) from exc
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
    with ctx.state.engine.connect() as conn:
        version_pk = conn.execute(
            sa.select(col(Placement.version_pk)).where(col(Placement.id) == payload.placement_id)
        ).scalar_one()

    def files() -> Iterator[ViewFile]:
        for batch in ctx.index.view_rows(version_pk, site):
            for path, digest, size, row in batch:
                if row is None:  # marked bad (by verify, by another publish) since planned
                    raise ReplanNeeded(
                        f"{payload.dataset}@{payload.version_id[:12]} at {site}: blob"
                        f" {digest} of {path} is not in the site's blob store; moving it again"
                    )
                yield ViewFile(path, digest, size, row.key, row.etag)

    blobs = _BlobCheck(ctx, site)
    result = publish_view(
        backend,
        payload.dataset,
        payload.version_id,
        files,
        io=ctx.io,
        buffers=ctx.buffers,
        check=blobs.settle,
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


class _BlobCheck:
    """Decides whether a blob whose stored object does not show the size and version token
    recorded at verification may still be published (see the module docstring, step 1)."""

    def __init__(self, ctx: ExecContext, site: str) -> None:
        self.ctx = ctx
        self.site = site
        self.backend = ctx.backends[site]
        self.settled: dict[tuple[str, str | None], BlobDamaged | None] = {}

    def settle(self, f: ViewFile, seen: ObjectInfo | None) -> BlobDamaged | None:
        """``seen``: what a view file linked to the blob shows (None: look at the blob)."""
        if seen is None:
            try:
                seen = self.backend.stat(f.key)
            except NotFound:
                return BlobDamaged(f.digest, f.key, f"{f.key} is missing (for {f.path})")
        if seen.size != f.size:
            why = f"{seen.key} holds {seen.size} bytes, not {f.size} (for {f.path})"
            return BlobDamaged(f.digest, f.key, why)
        if f.etag is None or seen.etag == f.etag:
            return None
        if (f.digest, seen.etag) not in self.settled:
            # Hash what was seen: for a link, exactly the bytes the view will show.
            got = hash_object(self.backend, seen.key, f.size, buffers=self.ctx.buffers)
            damage = None
            if got != f.digest:
                why = f"{f.key} was rewritten: it hashes to {got} (for {f.path})"
                damage = BlobDamaged(f.digest, f.key, why)
            else:  # only touched: the new token is the one to expect from now on
                row = ReplicaRow(f.digest, f.size, f.key, seen.etag)
                self.ctx.state.replicas.record(self.site, [row])
            self.settled[(f.digest, seen.etag)] = damage
        return self.settled[(f.digest, seen.etag)]
