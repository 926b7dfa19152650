"""Large blobs: ``chunks`` tasks send verified parts, one ``finalize`` commits and verifies.

* ``chunks``: chunks ``first..last-1`` of one large blob. A destination part is ``k``
  whole chunks (``PartPlan``: k = 1 unless the store's minimum part size or part count
  needs more); the task sends the parts whose first chunk is in its range, so every part
  has exactly one owner. It joins the blob's single upload (``ChunkMap.upload_for``),
  skips parts already done (the chunk map, plus ``durable_parts()`` where the store lists
  parts), reads each part pinned by ETag, verifies every chunk digest inside it,
  ``put_part``, then records the part with what the store showed for it (its proof:
  ``SupportsPartProofs``).
* ``finalize``: sends any part still missing (self-healing after an upload reset),
  commits, re-reads the whole object and checks the whole-file digest (unless the commit
  is ``ObjectInfo.verified``: every part was sent by this writer or proved by the proof a
  ``chunks`` task recorded, and the store's checksum of the whole matches), records the replica
  and forgets the upload. On mismatch it deletes the object, forgets the upload and
  raises a retryable ``ChecksumMismatch``; on the last attempt the source is marked bad.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from datasync.backends.base import Backend, PartLayout, SupportsPartProofs, Writer
from datasync.errors import ChecksumMismatch, NotFound, StorageError, TransientError, Unsupported
from datasync.manifest.hashing import digest_bytes
from datasync.transfer.exec.blobs import adopt, retryable_mismatch
from datasync.transfer.exec.context import ExecContext, check_cancel
from datasync.transfer.exec.reader import VerifiedReader
from datasync.transfer.failpoints import failpoint
from datasync.transfer.layout import blob_key
from datasync.transfer.payloads import ChunkedBlob, ChunksPayload, FinalizePayload
from datasync.transfer.readback import hash_object
from datasync.transfer.state import ClaimedTask, ReplicaRow
from datasync.transfer.tracing import traced_write

__all__ = ["PartPlan", "part_plan", "run_chunks", "run_finalize"]


@dataclass(frozen=True, slots=True)
class PartPlan:
    """How a chunked blob maps onto the destination's parts: a ``PartLayout`` whose part
    size is ``k`` whole chunks, so each chunk inside a part is verified on its own."""

    layout: PartLayout
    chunk_size: int

    @property
    def k(self) -> int:
        return self.layout.part_size // self.chunk_size

    @property
    def parts(self) -> int:
        return self.layout.count

    def chunks_of(self, j: int) -> range:
        last = -(-self.layout.size // self.chunk_size)
        return range(j * self.k, min((j + 1) * self.k, last))

    def parts_starting_in(self, first: int, last: int) -> list[int]:
        return [j for j in range(self.parts) if first <= j * self.k < last]


def part_plan(backend: Backend, size: int, chunk_size: int) -> PartPlan:
    """The smallest ``k`` that satisfies the store's minimum part size and part count."""
    caps = backend.capabilities
    k = max(1, -(-caps.min_part_size // chunk_size))
    while -(-size // (k * chunk_size)) > caps.max_parts:
        k += 1
    if k * chunk_size > caps.max_part_size and size > k * chunk_size:
        raise Unsupported(
            f"{backend.url}: parts of {k * chunk_size} bytes exceed the store's limit "
            f"{caps.max_part_size}; use a smaller chunk size"
        )
    return PartPlan(PartLayout(size, k * chunk_size), chunk_size)


def _open_upload(
    ctx: ExecContext, blob: ChunkedBlob, lay: PartPlan
) -> tuple[Backend, Writer, set[int]]:
    """Join (or start) the one upload of the blob at its site; return the parts done."""
    dst, digest = blob.dst_site, blob.digest
    backend = ctx.backends[dst]
    key = blob_key(digest)
    part_size = lay.layout.part_size
    token = ctx.state.uploads.upload_for(
        dst,
        digest,
        part_size,
        lay.parts,
        begin=lambda: backend.begin(key, blob.size, part_size).token,
    )
    try:
        writer = backend.begin(key, blob.size, part_size, token=token)
    except (NotFound, ValueError) as exc:
        # The upload vanished (committed, aborted, reaped): start a fresh one next time.
        ctx.state.uploads.forget(dst, digest)
        raise TransientError(
            f"upload of {digest} at {dst} was lost ({exc}); restarting it"
        ) from exc
    recorded = ctx.state.uploads.parts(dst, digest)
    done = set(recorded)
    if isinstance(writer, SupportsPartProofs):  # parts other tasks sent: their commit proof
        writer.accept_part_proofs({i: p for i, p in recorded.items() if p is not None})
    if backend.capabilities.lists_parts:
        done |= writer.durable_parts()
    return backend, writer, done


def _send_parts(
    ctx: ExecContext,
    blob: ChunkedBlob,
    lay: PartPlan,
    writer: Writer,
    parts: Sequence[int],
    cancel: threading.Event,
    *,
    record: bool = True,
) -> int:
    """Send ``parts`` (each verified chunk by chunk before it is written)."""
    dst, digest = blob.dst_site, blob.digest
    key = blob_key(digest)
    reader = VerifiedReader(ctx)

    def one(j: int) -> int:
        check_cancel(cancel)
        length = lay.layout.length(j)

        def check(data: memoryview) -> str | None:
            for i in lay.chunks_of(j):
                start = (i - j * lay.k) * lay.chunk_size
                got = digest_bytes(data[start : start + lay.chunk_size])
                if got != blob.chunk_digests[i]:
                    return f"chunk {i} hashed to {got}, expected {blob.chunk_digests[i]}"
            return None

        def write(data: memoryview) -> int:
            with traced_write(f"{dst}:{key}#{j}", "part"):
                writer.put_part(j, data)
            return len(data)

        with ctx.buffers.lease(length) as buf, memoryview(buf) as whole:
            n = reader.transfer(
                dst, blob.src, digest, lay.layout.offset(j), whole[:length], check, write
            )
        failpoint("after_put_part")
        if record:
            proof = writer.part_proof(j) if isinstance(writer, SupportsPartProofs) else None
            ctx.state.uploads.mark_part(dst, digest, j, writer.token, proof)
            failpoint("after_mark_part")
        return n

    futures = [ctx.io.submit(one, j) for j in parts]
    moved = 0
    error: BaseException | None = None
    for fut in futures:
        try:
            moved += fut.result()
        except BaseException as exc:
            error = error or exc
            cancel.set()  # the remaining parts of this task stop early
    if error is not None:
        raise error
    return moved


def run_chunks(ctx: ExecContext, payload: ChunksPayload, cancel: threading.Event) -> int:
    blob = payload.blob
    if ctx.index.has(blob.dst_site, blob.digest):
        return 0
    lay = part_plan(ctx.backends[blob.dst_site], blob.size, blob.chunk_size)
    if lay.parts <= 1:
        return 0  # a one-part object is not durable before commit: finalize writes it
    owned = lay.parts_starting_in(payload.first, payload.last)
    _backend, writer, done = _open_upload(ctx, blob, lay)
    try:
        return _send_parts(ctx, blob, lay, writer, [j for j in owned if j not in done], cancel)
    finally:
        writer.close()  # keeps the upload for the other chunk tasks and finalize


def run_finalize(
    ctx: ExecContext, payload: FinalizePayload, task: ClaimedTask, cancel: threading.Event
) -> int:
    blob = payload.blob
    dst, digest, size = blob.dst_site, blob.digest, blob.size
    key = blob_key(digest)
    if ctx.index.has(dst, digest):
        return 0
    if adopt(ctx, dst, digest, size):  # committed by a worker killed right after
        ctx.state.uploads.forget(dst, digest)
        return 0
    backend = ctx.backends[dst]
    lay = part_plan(backend, size, blob.chunk_size)
    one_part = lay.parts <= 1
    if one_part:
        writer = backend.begin(key, size, lay.layout.part_size)
        done: set[int] = set()
    else:
        backend, writer, done = _open_upload(ctx, blob, lay)
    try:
        missing = [j for j in range(lay.parts) if j not in done]
        moved = (
            _send_parts(ctx, blob, lay, writer, missing, cancel, record=not one_part)
            if missing
            else 0
        )
        check_cancel(cancel)
        failpoint("before_commit")
        with traced_write(f"{dst}:{key}", "commit"):
            info = writer.commit()
    except BaseException:
        if one_part:  # an unrecorded one-part upload: nobody can resume it
            with contextlib.suppress(StorageError):
                writer.abort()
        raise
    finally:
        writer.close()  # after commit a no-op; otherwise the retry resumes it
    failpoint("after_commit")
    # A store that proved it holds exactly the verified parts needs no re-read. The re-read
    # goes a part at a time: the pool's part-sized buffers are reused, not evicted for a
    # smaller size (a POSIX direct read-back of 256 MiB then takes 4 reads, not 32).
    stored = (
        digest
        if info.verified
        else hash_object(backend, key, size, buffers=ctx.buffers, block=lay.layout.part_size)
    )
    if stored != digest:
        backend.delete(key)
        ctx.state.uploads.forget(dst, digest)
        message = (
            f"{key} at {dst} re-read after commit as {stored}, expected {digest}; "
            "deleted, upload restarted"
        )
        if task.attempts >= task.max_attempts:
            ctx.state.replicas.mark_bad(
                blob.src.site,
                digest,
                blob.src.key,
                f"every chunk matched but the whole object hashed to {stored} on "
                f"{task.attempts} attempts at {dst}",
            )
            raise ChecksumMismatch(message, url=f"{backend.url}/{key}")
        raise retryable_mismatch(message, f"{backend.url}/{key}")
    ctx.state.replicas.record(dst, [ReplicaRow(digest, size, key, info.etag)])
    ctx.state.uploads.forget(dst, digest)
    return moved
