"""The ``publish`` task: build a placement's view from the site's blob store.

It runs when every other task of the placement is done. It streams the manifest in
batches, resolves each digest to its blob-store replica at the site (never to a
registration source: only bytes datasync wrote and verified are published), and hands
the files to ``datasync.transfer.materialize``. The queue's ``complete`` then makes the
placement READY. A version registered from a producer manifest (unverified) is marked
verified after its first publish, since every blob was just checked against its digests.
"""

from __future__ import annotations

from collections.abc import Iterator

from datasync.errors import NotFound
from datasync.transfer.exec.context import ExecContext
from datasync.transfer.failpoints import failpoint
from datasync.transfer.materialize import PublishResult, ViewFile, publish_view
from datasync.transfer.payloads import PublishPayload

__all__ = ["run_publish"]

_BATCH = 500


def run_publish(ctx: ExecContext, payload: PublishPayload) -> PublishResult:
    """Build the view of the payload's version at its site (idempotent)."""
    site = payload.dst_site
    version = ctx.manifests.resolve(f"{payload.dataset}@{payload.version_id}")
    backend = ctx.backends[site]

    def files() -> Iterator[ViewFile]:
        batch: list[tuple[str, str, int]] = []
        for entry in ctx.manifests.iter_entries(version):
            batch.append((entry.path, entry.digest, entry.size))
            if len(batch) >= _BATCH:
                yield from _resolve(ctx, site, batch)
                batch = []
        yield from _resolve(ctx, site, batch)

    result = publish_view(
        backend,
        payload.dataset,
        payload.version_id,
        files,
        labels=version.labels,
        buffers=ctx.buffers,
    )
    failpoint("after_publish")
    if not version.verified:
        ctx.manifests.mark_verified(version)
    return result


def _resolve(ctx: ExecContext, site: str, batch: list[tuple[str, str, int]]) -> Iterator[ViewFile]:
    if not batch:
        return
    rows = ctx.index.blobs(site, sorted({d for _, d, _ in batch}))
    for path, digest, size in batch:
        row = rows.get(digest)
        if row is None:
            raise NotFound(f"cannot publish: blob {digest} of {path} is not a replica at {site}")
        yield ViewFile(path, digest, size, row.key)
