"""The ``blobs`` task: a batch of small blobs, each copied whole into the blob store.

The batch is dealt into a few lanes (one per I/O thread); each lane copies its blobs one
after the other holding one set of host-wide slots and one buffer (``SlotLane``). Each
blob is read whole from its source, hashed and compared with the manifest digest
BEFORE anything is written (``VerifiedReader``), written as one part to
``.datasync/blobs/..`` (invisible until commit), then the committed object is re-read and
re-hashed (unless the store proved it holds exactly those bytes: ``ObjectInfo.verified``,
"Verified writes" in ``backends/base.py``); the batch's replicas are recorded in one
transaction at the end. Where the destination has a group commit (POSIX), the batch's
objects are staged (bytes durable), renamed into place together, the names made durable
with a few flushes for the whole batch, then every object is re-read and re-hashed, and
only then recorded.

Where the destination has ``put_small`` (``capabilities.small_puts``: POSIX, memory), the
blobs of at most ``PUT_SMALL_MAX`` bytes take a shorter path with the same order: the
lanes only read and verify, each blob into its own region of one buffer leased for the
batch, then ONE backend call writes every verified blob (temp, durable, rename, names
durable) and reads each back at its key; each re-read digest is matched here before the
row is recorded. One retry wrapper, one limits check and one concurrency slot at the
destination per batch instead of ~10 backend calls per blob. A blob that fails (a source
that changed, a write, a re-read that does not match) fails alone.

Idempotent (invariant 5): blobs already in the site's blob store are skipped, and on a
retry an object found committed but unrecorded (a worker killed between commit and
record) is re-verified and adopted instead of rewritten.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading

from datasync.backends.base import (
    Backend,
    GroupCommit,
    ObjectInfo,
    SupportsGroupCommit,
    SupportsLocalTree,
    SupportsPutSmall,
)
from datasync.errors import ChecksumMismatch, NotFound, StorageError
from datasync.transfer.exec.context import ExecContext, check_cancel
from datasync.transfer.exec.reader import VerifiedReader, whole_check
from datasync.transfer.failpoints import failpoint
from datasync.transfer.layout import blob_key
from datasync.transfer.limits import SlotLane
from datasync.transfer.payloads import BlobItem, BlobsPayload
from datasync.transfer.readback import hash_object
from datasync.transfer.siteindex import SourceReplica
from datasync.transfer.state import ReplicaRow
from datasync.transfer.tracing import traced_write

__all__ = ["PUT_SMALL_MAX", "adopt", "group_commit_of", "lanes", "run_blobs"]

# Blobs up to this size go through ``put_small`` where the destination has it; a batch
# (``planner.batch_bytes``) then leases at most its own size, once.
PUT_SMALL_MAX = 1024 * 1024


def retryable_mismatch(message: str, url: str) -> ChecksumMismatch:
    """A mismatch of bytes WE wrote: retrying from the source can help."""
    exc = ChecksumMismatch(message, url=url)
    exc.retryable = True
    return exc


def group_commit_of(backend: Backend) -> GroupCommit | None:
    """The backend's group commit for a batch of small objects, if it has one."""
    if backend.capabilities.group_commit and isinstance(backend, SupportsGroupCommit):
        return backend.group_commit()
    return None


def adopt(ctx: ExecContext, dst: str, digest: str, size: int) -> bool:
    """An object already committed at the blob key (by a killed worker) becomes a replica
    if it re-hashes to ``digest``. Returns True when adopted."""
    backend = ctx.backends[dst]
    key = blob_key(digest)
    try:
        info = backend.stat(key)
    except NotFound:
        return False
    if info.size != size or hash_object(backend, key, size, buffers=ctx.buffers) != digest:
        backend.delete(key)  # never trusted, and in the way of the new upload
        return False
    # A killed group commit may have renamed it without flushing the name yet.
    if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
        backend.make_durable(key)
    ctx.state.replicas.record(dst, [ReplicaRow(digest, size, key, info.etag)])
    return True


def run_blobs(
    ctx: ExecContext, payload: BlobsPayload, attempts: int, cancel: threading.Event
) -> int:
    """Copy the batch; return the bytes written at the destination."""
    dst = payload.dst_site
    present = ctx.index.present(dst, [i.digest for i in payload.items])
    todo = [i for i in payload.items if i.digest not in present]
    if attempts > 1:  # a killed attempt may have committed objects it never recorded
        todo = [i for i in todo if not adopt(ctx, dst, i.digest, i.size)]
    reader = VerifiedReader(ctx)
    sources = ctx.index.sources_for_many([i.digest for i in todo], dst=dst) if todo else {}
    small, todo = _split_small(ctx.backends[dst], todo)
    group = group_commit_of(ctx.backends[dst]) if todo else None
    futures = [
        ctx.io.submit(_copy_lane, ctx, reader, dst, items, sources, cancel, group)
        for items in lanes(todo, ctx.lanes)
    ]
    outcomes: list[ReplicaRow | BaseException] = []
    if small:
        try:
            outcomes.extend(_put_batch(ctx, reader, dst, small, sources, cancel))
        except BaseException as exc:
            outcomes.append(exc)
    for fut in futures:
        outcomes.extend(fut.result())
    verified: list[ReplicaRow] = []
    error: BaseException | None = None
    for outcome in outcomes:
        if isinstance(outcome, BaseException):  # collect all; the first is re-raised
            error = error or outcome
        else:
            verified.append(outcome)
    if group is not None:
        try:
            verified = _commit_group(ctx, dst, group, verified)
        except BaseException as exc:
            error = error or exc
            verified = []
    # One transaction records the whole batch (also what succeeded before an error).
    # A kill before this point leaves verified, unrecorded objects: adopted next attempt.
    if verified:
        ctx.state.replicas.record(dst, verified)
    if error is not None:
        raise error
    return sum(row.size for row in verified)


def lanes(items: list[BlobItem], n: int) -> list[list[BlobItem]]:
    """Deal ``items`` into at most ``n`` lanes, same-source items next to each other so a
    lane seldom switches the slots it holds."""
    ordered = sorted(items, key=lambda i: i.src.site)
    return [ordered[k :: max(n, 1)] for k in range(min(n, len(ordered)))]


def _split_small(backend: Backend, items: list[BlobItem]) -> tuple[list[BlobItem], list[BlobItem]]:
    """``(blobs for put_small, the others)``: all others where the backend lacks it."""
    if not (backend.capabilities.small_puts and isinstance(backend, SupportsPutSmall)):
        return [], items
    small = [i for i in items if i.size <= PUT_SMALL_MAX]
    return small, [i for i in items if i.size > PUT_SMALL_MAX]


def _put_batch(
    ctx: ExecContext,
    reader: VerifiedReader,
    dst: str,
    items: list[BlobItem],
    sources: dict[str, list[SourceReplica]],
    cancel: threading.Event,
) -> list[ReplicaRow | BaseException]:
    """Read and verify ``items`` in lanes, each blob into its own region of one buffer
    (leased once, before any slot), then write, commit and read them all back with one
    ``put_small``. Returns each blob's row or error."""
    groups = lanes(items, ctx.lanes)
    with ctx.buffers.lease(max(1, sum(i.size for i in items))) as buf, memoryview(buf) as whole:
        futures = []
        offset = 0
        for group in groups:
            size = sum(i.size for i in group)
            region = whole[offset : offset + size]
            offset += size
            futures.append(
                ctx.io.submit(_verify_lane, ctx, reader, dst, group, sources, cancel, region)
            )
        cf.wait(futures)  # every lane is done with the buffer before it can be released
        out: list[ReplicaRow | BaseException] = []
        ready: list[tuple[BlobItem, memoryview]] = []
        for group, fut in zip(groups, futures, strict=True):
            try:
                results = fut.result()
            except BaseException as exc:
                out.append(exc)
                continue
            for item, got in zip(group, results, strict=True):
                if isinstance(got, BaseException):
                    out.append(got)
                else:
                    ready.append((item, got))
        if ready:
            out.extend(_put_verified(ctx, dst, ready))
    return out


def _verify_lane(
    ctx: ExecContext,
    reader: VerifiedReader,
    dst: str,
    items: list[BlobItem],
    sources: dict[str, list[SourceReplica]],
    cancel: threading.Event,
    region: memoryview,
) -> list[memoryview | BaseException]:
    """Fill ``region`` with ``items``' bytes, one after the other, each verified against
    its manifest digest (``VerifiedReader``), holding one set of slots for the lane."""
    out: list[memoryview | BaseException] = []
    offset = 0
    with ctx.limits.lane() as lane:
        for item in items:
            mem = region[offset : offset + item.size]
            offset += item.size
            try:
                check_cancel(cancel)
                known = sources.get(item.digest, [])
                check = whole_check(item.digest)
                out.append(
                    reader.transfer(dst, item.src, item.digest, 0, mem, check, _keep, lane, known)
                )
            except BaseException as exc:
                out.append(exc)
    return out


def _keep(data: memoryview) -> memoryview:
    return data


def _put_verified(
    ctx: ExecContext, dst: str, ready: list[tuple[BlobItem, memoryview]]
) -> list[ReplicaRow | BaseException]:
    """Write verified blobs with one ``put_small`` (holding one slot at ``dst``), then
    match each re-read digest with the manifest's: a mismatch deletes the object."""
    backend = ctx.backends[dst]
    assert isinstance(backend, SupportsPutSmall)
    keys = [blob_key(item.digest) for item, _ in ready]
    with ctx.limits.slot(dst), contextlib.ExitStack() as traced:
        # One slot, one stream: the call is traced once as the slot holder ("batch"), and
        # each object under its own key ("batched") for the overlap checks.
        traced.enter_context(traced_write(f"{dst}:put_small#{keys[0]}", "batch"))
        for key in keys:
            traced.enter_context(traced_write(f"{dst}:{key}", "batched"))
        results = backend.put_small(
            [(key, data) for key, (_, data) in zip(keys, ready, strict=True)]
        )
    failpoint("after_commit")
    out: list[ReplicaRow | BaseException] = []
    for (item, _), key, res in zip(ready, keys, results, strict=True):
        if isinstance(res, BaseException):
            out.append(res)
        elif res.digest != item.digest:
            try:
                backend.delete(key)
            except StorageError as exc:
                out.append(exc)
                continue
            out.append(
                retryable_mismatch(
                    f"{key} at {dst} re-read as {res.digest}, expected {item.digest}; deleted",
                    f"{backend.url}/{key}",
                )
            )
        else:
            out.append(ReplicaRow(item.digest, item.size, key, res.info.etag))
    return out


def _copy_lane(
    ctx: ExecContext,
    reader: VerifiedReader,
    dst: str,
    items: list[BlobItem],
    sources: dict[str, list[SourceReplica]],
    cancel: threading.Event,
    group: GroupCommit | None,
) -> list[ReplicaRow | BaseException]:
    """Copy ``items`` one after the other as one stream: one buffer (taken before any slot,
    so no slot is held while waiting for memory) and one set of slots (``SlotLane``) for
    the lane, not per blob. Returns each blob's row or error, in order."""
    out: list[ReplicaRow | BaseException] = []
    with (
        ctx.buffers.lease(max(i.size for i in items)) as buf,
        memoryview(buf) as whole,
        ctx.limits.lane() as lane,
    ):
        for item in items:
            try:
                known = sources.get(item.digest, [])
                out.append(_copy_blob(ctx, reader, dst, item, known, cancel, group, whole, lane))
            except BaseException as exc:
                out.append(exc)
    return out


def _copy_blob(
    ctx: ExecContext,
    reader: VerifiedReader,
    dst: str,
    item: BlobItem,
    sources: list[SourceReplica],
    cancel: threading.Event,
    group: GroupCommit | None,
    whole: memoryview,
    lane: SlotLane,
) -> ReplicaRow:
    """Copy, verify and return the replica row of one small blob (recorded by the caller).

    With a ``group`` the blob is only staged (bytes durable, invisible): the caller's
    ``_commit_group`` renames, flushes and re-verifies it."""
    check_cancel(cancel)
    backend = ctx.backends[dst]
    key = blob_key(item.digest)

    committed: list[ObjectInfo] = []

    def write(data: memoryview) -> str | None:
        with traced_write(f"{dst}:{key}", "blob"):
            writer = (group or backend).begin(key, item.size, max(item.size, 1))
            try:
                if item.size:
                    writer.put_part(0, data)
                if group is not None:
                    group.stage(writer)
                    return None
                committed.append(writer.commit())
                return committed[-1].etag
            except BaseException:
                with contextlib.suppress(StorageError):
                    writer.abort()
                raise

    mem = whole[: item.size]
    etag = reader.transfer(
        dst, item.src, item.digest, 0, mem, whole_check(item.digest), write, lane, sources
    )
    if group is not None:
        return ReplicaRow(item.digest, item.size, key, None)
    failpoint("after_commit")
    # Verify what the store now holds, re-using the lane's buffer (no second budget wait),
    # unless the store proved it holds the bytes just verified (ObjectInfo.verified).
    proved = bool(committed) and committed[-1].verified
    stored = item.digest if proved else hash_object(backend, key, item.size, buf=whole)
    if stored != item.digest:
        backend.delete(key)
        raise retryable_mismatch(
            f"{key} at {dst} re-read as {stored}, expected {item.digest}; deleted",
            f"{backend.url}/{key}",
        )
    return ReplicaRow(item.digest, item.size, key, etag)


def _commit_group(
    ctx: ExecContext, dst: str, group: GroupCommit, staged: list[ReplicaRow]
) -> list[ReplicaRow]:
    """Publish a batch's staged blobs at once, then re-read and re-hash each; return the
    replica rows to record (the names are durable when this returns).

    A blob that re-reads wrong is deleted; then the good ones are recorded here and a
    retryable ``ChecksumMismatch`` naming the bad ones is raised."""
    backend = ctx.backends[dst]
    with contextlib.ExitStack() as traced:
        # Each object is written (renamed into place) here: trace it under its own key.
        for row in staged:
            traced.enter_context(traced_write(f"{dst}:{row.key}", "blob"))
        infos = group.commit_all()
    failpoint("after_commit")

    def check(row: ReplicaRow) -> str | None:
        stored = hash_object(backend, row.key, row.size)
        if stored == row.digest:
            return None
        backend.delete(row.key)
        return f"{row.key} at {dst} re-read as {stored}, expected {row.digest}; deleted"

    ok: list[ReplicaRow] = []
    wrong: list[str] = []
    for row, problem in zip(staged, ctx.io.map(check, staged), strict=True):
        if problem is None:
            info = infos.get(row.key)
            ok.append(row._replace(etag=None if info is None else info.etag))
        else:
            wrong.append(problem)
    if wrong:
        if ok:  # record the good ones first: they are verified and durable
            ctx.state.replicas.record(dst, ok)
        raise retryable_mismatch("; ".join(wrong[:3]), backend.url)
    return ok
