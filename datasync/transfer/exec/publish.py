"""The ``publish`` task: build a placement's view from the site's blob store.

It runs when every other task of the placement is done, in two passes over the manifest:

1. Check every blob the view will use: its blob-store replica at the site exists, has its
   size, and still carries the version token (ETag, POSIX ``mtime-ino-size``) recorded
   when it was verified; a changed token means the object was rewritten, so it is
   re-hashed (a mere ``touch`` passes and the token is refreshed). Blobs that are missing
   or hash wrong are marked bad and the placement is re-planned (``ReplanNeeded``): a
   store that lost or damaged acknowledged bytes heals instead of failing forever.
2. Hand the files to ``datasync.transfer.materialize``, which builds the view atomically.
   Only blob-store replicas are ever used: bytes datasync wrote and verified.

The queue's ``complete`` then makes the placement READY. A version registered from a
producer manifest (unverified) is marked verified after its first publish, since every
blob was just checked against its digests.
"""

from __future__ import annotations

from collections.abc import Iterator

from datasync.errors import NotFound
from datasync.transfer.exec.context import ExecContext, ReplanNeeded
from datasync.transfer.failpoints import failpoint
from datasync.transfer.materialize import PublishResult, ViewFile, publish_view
from datasync.transfer.payloads import PublishPayload
from datasync.transfer.siteindex import BlobRow
from datasync.transfer.state import ReplicaRow
from datasync.transfer.verify import hash_object

__all__ = ["run_publish"]

_BATCH = 500


def run_publish(ctx: ExecContext, payload: PublishPayload) -> PublishResult:
    """Build the view of the payload's version at its site (idempotent)."""
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
