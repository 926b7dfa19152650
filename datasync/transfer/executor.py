"""Execute one claimed task: verified bytes from a source replica into a site's blob store.

Kinds (payloads in docs/transfers.md, "Task payloads"):

* ``blobs``: a batch of small blobs. Each is read whole from its source (pinned by ETag),
  hashed and compared with the manifest digest BEFORE anything is written, written as one
  part to ``.datasync/blobs/..`` (begin/put_part/commit: invisible until commit), then the
  committed object is re-read and re-hashed; the batch's replicas are recorded in one
  transaction at the end. Where the destination has a group commit (POSIX
  ``group_commit()``), the batch's objects are staged (bytes durable) and renamed into
  place together, the names made durable with a few flushes for the whole batch, then
  every object is re-read and re-hashed, and only then recorded.
* ``chunks``: chunks ``first..last-1`` of one large blob. A destination part is ``k`` whole
  chunks (``PartPlan``: k = 1 unless the store's minimum part size is larger); the task
  sends the parts whose first chunk is in its range. It joins the blob's single upload
  (``ChunkMap.upload_for``), skips parts already done (the chunk map, plus
  ``durable_parts()`` where the store lists parts), reads each part range pinned by ETag,
  verifies every chunk digest inside it, ``put_part``, then records the part.
* ``finalize``: sends any part still missing (self-healing after an upload reset), commits,
  re-reads the whole object and checks the whole-file digest, records the replica and
  forgets the upload. On mismatch it deletes the object, forgets the upload and raises a
  retryable ``ChecksumMismatch``; on the last attempt the source replica is marked bad.
* ``publish``: ``materialize.publish_view`` once every blob is a replica; the queue's
  ``complete`` then makes the placement READY.

Invariants: no byte is written before its digest (chunk or whole) matched the manifest, and
no replica is recorded before the stored object was re-read and matched (invariant 2).
Every task is idempotent (invariant 5): a blob already a replica is skipped, and an object
found committed but unrecorded (worker killed between commit and record) is re-verified and
adopted rather than rewritten. A source that returns wrong bytes twice is marked bad with a
reason and the next ok replica is tried.

I/O runs in the process's bounded thread pool; every part holds one pooled buffer, one
concurrency slot on the source site, the destination site and their link, and passes
through the bandwidth buckets. ``Throttled`` halves the throttled site's concurrency
(``Limits.on_throttled``) and the part is retried after the pause.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from datasync.backends.base import Backend, Writer
from datasync.backends.registry import open_backend
from datasync.config import SiteConfig
from datasync.db.engine import write_transaction
from datasync.db.transfer_tables import Placement, Replica
from datasync.errors import (
    ChecksumMismatch,
    ConfigError,
    DatasyncError,
    NotFound,
    SourceChanged,
    StorageError,
    Throttled,
    TransientError,
    Unsupported,
)
from datasync.manifest.hashing import digest_bytes
from datasync.manifest.store import ManifestStore
from datasync.transfer.buffers import BufferPool
from datasync.transfer.failpoints import failpoint
from datasync.transfer.limits import Limits
from datasync.transfer.materialize import PublishResult, ViewFile, blob_key, publish_view
from datasync.transfer.siteindex import ChunkMap, SiteIndex, SourceReplica
from datasync.transfer.taskqueue import ClaimedTask
from datasync.transfer.tracing import traced_write
from datasync.transfer.verify import hash_object, read_into

__all__ = ["Executor", "LeaseLost", "PartPlan", "SiteBackends", "part_plan"]

T = TypeVar("T")
_R: sa.Table = Replica.__table__  # type: ignore[attr-defined]
_PL: sa.Table = Placement.__table__  # type: ignore[attr-defined]
_IN_BATCH = 500


class LeaseLost(TransientError):
    """The worker lost the task's lease (another worker owns it now): stop writing."""


def _retryable(exc: DatasyncError) -> DatasyncError:
    # ChecksumMismatch is permanent by class; a mismatch we can retry from the source is not.
    exc.retryable = True
    return exc


class SiteBackends:
    """One backend per configured site, opened on first use, shared by the process's threads."""

    def __init__(
        self,
        sites: Mapping[str, SiteConfig],
        opener: Callable[[str, Mapping[str, Any]], Backend] = open_backend,
    ) -> None:
        self._sites = dict(sites)
        self._opener = opener
        self._open: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def __getitem__(self, site: str) -> Backend:
        with self._lock:
            backend = self._open.get(site)
            if backend is None:
                cfg = self._sites.get(site)
                if cfg is None:
                    raise ConfigError(f"site {site!r} is not configured ([sites.{site}])")
                backend = self._opener(cfg.url, cfg.options)
                self._open[site] = backend
            return backend

    def close(self) -> None:
        with self._lock:
            for backend in self._open.values():
                with contextlib.suppress(Exception):
                    backend.close()
            self._open.clear()


@dataclass(frozen=True, slots=True)
class _Item:
    digest: str
    size: int
    src: SourceReplica


def _whole_check(expected: str) -> Callable[[memoryview], str | None]:
    def check(data: memoryview) -> str | None:
        got = digest_bytes(data)
        return None if got == expected else f"hashed to {got}, expected {expected}"

    return check


@dataclass(frozen=True, slots=True)
class PartPlan:
    """How a chunked blob maps onto the destination's parts.

    A part is ``k`` whole chunks, ``k`` the smallest that satisfies the store's minimum
    part size and part count (S3: 5 MiB, 10,000 parts); with the default 64 MiB chunks
    ``k`` is 1. A chunk task sends the parts whose first chunk lies in its range, so every
    part has exactly one owner, and each chunk inside a part is verified on its own."""

    size: int
    chunk_size: int
    k: int

    @property
    def part_size(self) -> int:
        return self.k * self.chunk_size

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_length(self, j: int) -> int:
        return min(self.part_size, self.size - j * self.part_size)

    def chunks_of(self, j: int) -> range:
        last = max(1, -(-self.size // self.chunk_size))
        return range(j * self.k, min((j + 1) * self.k, last))

    def parts_starting_in(self, first: int, last: int) -> list[int]:
        return [j for j in range(self.parts) if first <= j * self.k < last]


def part_plan(backend: Backend, size: int, chunk_size: int) -> PartPlan:
    caps = backend.capabilities
    k = max(1, -(-caps.min_part_size // chunk_size))
    while -(-size // (k * chunk_size)) > caps.max_parts:
        k += 1
    if k * chunk_size > caps.max_part_size and size > k * chunk_size:
        raise Unsupported(
            f"{backend.url}: parts of {k * chunk_size} bytes exceed the store's limit "
            f"{caps.max_part_size}; use a smaller chunk size"
        )
    return PartPlan(size, chunk_size, k)


def _group_commit(backend: Backend) -> Any:
    """The backend's group commit for a batch of small objects, if it has one."""
    factory = getattr(backend, "group_commit", None)
    return factory() if callable(factory) else None


def _close_writer(writer: Writer) -> None:
    # Release local resources (a POSIX temp fd) of a writer we neither commit nor abort.
    close = getattr(writer, "close", None)
    if callable(close):
        close()


class Executor:
    """Runs claimed tasks. Thread-safe; one per worker process."""

    def __init__(
        self,
        *,
        engine: Engine,
        backends: SiteBackends,
        limits: Limits,
        buffers: BufferPool,
        io: cf.ThreadPoolExecutor,
        index: SiteIndex | None = None,
        chunks: ChunkMap | None = None,
        manifests: ManifestStore | None = None,
        throttle_retries: int = 4,
    ) -> None:
        self.engine = engine
        self.backends = backends
        self.limits = limits
        self.buffers = buffers
        self.io = io
        self.index = index or SiteIndex(engine)
        self.chunks = chunks or ChunkMap(engine)
        self.manifests = manifests or ManifestStore(engine)
        self.throttle_retries = throttle_retries

    # -- entry point ------------------------------------------------------------------------

    def execute(self, task: ClaimedTask, cancel: threading.Event | None = None) -> int:
        """Run ``task``; return the bytes written at the destination (0 for a no-op)."""
        cancel = cancel or threading.Event()
        p = task.payload
        if task.kind == "blobs":
            return self._blobs(p, task.attempts, cancel)
        if task.kind == "chunks":
            return self._chunks(p, cancel)
        if task.kind == "finalize":
            return self._finalize(p, task, cancel)
        if task.kind == "publish":
            self.publish(int(p.get("placement_id", task.placement_id)))
            return 0
        raise ValueError(f"unknown task kind {task.kind!r}")

    # -- shared pieces ------------------------------------------------------------------------

    def _check(self, cancel: threading.Event) -> None:
        if cancel.is_set():
            raise LeaseLost("lease lost to another worker; stopping this task")

    def _throttle_retry(self, fn: Callable[[], T]) -> T:
        """Retry ``fn`` after throttling pauses (the slot wait honours ``retry_after``)."""
        for attempt in range(self.throttle_retries + 1):
            try:
                return fn()
            except Throttled:
                if attempt == self.throttle_retries:
                    raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _throttle_guard(self, site: str) -> Iterator[None]:
        try:
            yield
        except Throttled as exc:
            self.limits.on_throttled(site, exc.retry_after)
            raise
        self.limits.on_success(site)

    def _sources(self, first: SourceReplica, digest: str, dst: str) -> Iterator[SourceReplica]:
        """The payload's source first, then every other ok replica not at ``dst``."""
        seen = {(first.site, first.key)}
        yield first
        for src in self.index.sources_for(digest, exclude_site=dst):
            if (src.site, src.key) not in seen:
                seen.add((src.site, src.key))
                yield src

    def _read_checked(
        self,
        src: SourceReplica,
        offset: int,
        mem: memoryview,
        check: Callable[[memoryview], str | None],
    ) -> tuple[memoryview, str | None]:
        """Read ``mem``'s length at ``offset`` from ``src``; return the bytes and what is
        wrong with them (None: they match the manifest).

        A moved ETag is detected (``SourceChanged``) and the read repeated unpinned: the
        digest comparison then decides whether the new bytes are still the blob."""
        backend = self.backends[src.site]
        with self._throttle_guard(src.site):
            try:
                got = read_into(backend, src.key, offset, mem, etag=src.etag)
            except SourceChanged:
                got = read_into(backend, src.key, offset, mem, etag=None)
        if len(got) != len(mem):
            return got, f"short read: {len(got)} of {len(mem)} bytes"
        return got, check(got)

    def _verified_range(
        self,
        dst: str,
        first: SourceReplica,
        digest: str,
        offset: int,
        mem: memoryview,
        check: Callable[[memoryview], str | None],
        write: Callable[[SourceReplica, memoryview], T],
    ) -> T:
        """Read a range that must pass ``check`` (digests against the manifest) from the first
        good source, then ``write`` it while still holding the transfer slots.

        A source giving wrong bytes twice in a row, or missing the object, is marked bad
        with the reason; then the next source is tried."""
        problems: list[str] = []
        for src in self._sources(first, digest, dst):
            with self.limits.slot(dst, src=src.site):
                try:
                    got, wrong = self._read_checked(src, offset, mem, check)
                    if wrong:  # once more: a flipped bit in flight does not condemn the source
                        got, wrong = self._read_checked(src, offset, mem, check)
                except NotFound as exc:
                    wrong = f"missing at source: {exc}"
                else:
                    if wrong is None:
                        self.limits.take_bandwidth(len(got), dst, src=src.site)
                        with self._throttle_guard(dst):
                            return write(src, got)
                    wrong = f"bytes {offset}..{offset + len(mem)}: {wrong} (read twice)"
            self.index.mark_bad(src.site, digest, src.key, wrong)
            problems.append(f"{src.site}:{src.key}: {wrong}")
        raise ChecksumMismatch(f"no good source for {digest}: " + "; ".join(problems))

    def _present(self, site: str, digests: Sequence[str]) -> set[str]:
        """Which of ``digests`` are already ok replicas at ``site`` (one query per 500)."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(digests), _IN_BATCH):
                batch = list(digests[i : i + _IN_BATCH])
                rows = conn.execute(
                    sa.select(_R.c.digest).where(
                        _R.c.site == site, _R.c.state == "ok", _R.c.digest.in_(batch)
                    )
                )
                found.update(r[0] for r in rows)
        return found

    def _adopt(self, dst: str, digest: str, size: int, key: str) -> bool:
        """An object already committed at ``key`` (by a killed worker) becomes a replica if
        it re-hashes to ``digest``. Returns True when adopted."""
        backend = self.backends[dst]
        try:
            info = backend.stat(key)
        except NotFound:
            return False
        if info.size != size or hash_object(backend, key, size, buffers=self.buffers) != digest:
            backend.delete(key)  # never trusted, and in the way of the new upload
            return False
        # A killed group commit may have renamed it without flushing the name yet.
        make_durable = getattr(backend, "make_durable", None)
        if callable(make_durable):
            make_durable(key)
        self.index.record(dst, digest, size, key, etag=info.etag)
        return True

    # -- blobs ------------------------------------------------------------------------------

    def _blobs(self, p: Mapping[str, Any], attempts: int, cancel: threading.Event) -> int:
        dst = str(p["dst_site"])
        items = [
            _Item(
                str(it["digest"]),
                int(it["size"]),
                SourceReplica(str(it["src_site"]), str(it["src_key"]), it.get("src_etag"), 0),
            )
            for it in p["items"]
        ]
        present = self._present(dst, [i.digest for i in items])
        todo = [i for i in items if i.digest not in present]
        if attempts > 1:  # a killed attempt may have committed objects it never recorded
            todo = [i for i in todo if not self._adopt(dst, i.digest, i.size, blob_key(i.digest))]
        group = _group_commit(self.backends[dst]) if todo else None
        futures = [self.io.submit(self._copy_blob, dst, item, cancel, group) for item in todo]
        verified: list[tuple[str, int, str, str | None]] = []
        error: BaseException | None = None
        for fut in futures:
            try:
                verified.append(fut.result())
            except BaseException as exc:  # collect all; the first is re-raised
                error = error or exc
        if group is not None:
            try:
                verified = self._commit_group(dst, group, verified)
            except BaseException as exc:
                error = error or exc
                verified = []
        # One transaction records the whole batch (also what succeeded before an error).
        # A kill before this point leaves verified, unrecorded objects: adopted next attempt.
        if verified:
            with write_transaction(self.engine) as conn:
                SiteIndex.record_many(conn, dst, verified)
        if error is not None:
            raise error
        return sum(size for _d, size, _k, _e in verified)

    def _copy_blob(
        self, dst: str, item: _Item, cancel: threading.Event, group: Any = None
    ) -> tuple[str, int, str, str | None]:
        """Copy, verify and return the replica row of one small blob (recorded by the caller).

        With a ``group`` the blob is only staged (bytes durable, invisible): the caller's
        ``_commit_group`` renames, flushes and re-verifies it."""
        self._check(cancel)
        backend = self.backends[dst]
        key = blob_key(item.digest)

        def write(src: SourceReplica, data: memoryview) -> str | None:
            with traced_write(f"{dst}:{key}", "blob"):
                writer = (group or backend).begin(key, item.size, max(item.size, 1))
                try:
                    if item.size:
                        writer.put_part(0, data)
                    if group is not None:
                        group.stage(writer)
                        return None
                    return writer.commit().etag
                except BaseException:
                    with contextlib.suppress(StorageError):
                        writer.abort()
                    raise

        if group is not None:
            with self.buffers.lease(item.size) as buf, memoryview(buf) as whole:
                mem = whole[: item.size]
                self._throttle_retry(
                    lambda: self._verified_range(
                        dst, item.src, item.digest, 0, mem, _whole_check(item.digest), write
                    )
                )
            return item.digest, item.size, key, None

        with self.buffers.lease(item.size) as buf, memoryview(buf) as whole:
            mem = whole[: item.size]
            etag = self._throttle_retry(
                lambda: self._verified_range(
                    dst, item.src, item.digest, 0, mem, _whole_check(item.digest), write
                )
            )
            failpoint("after_commit")
            # Verify what the store now holds, re-using this buffer (no second budget wait).
            stored = hash_object(backend, key, item.size, buf=whole)
        if stored != item.digest:
            backend.delete(key)
            raise _retryable(
                ChecksumMismatch(
                    f"{key} at {dst} re-read as {stored}, expected {item.digest}; deleted",
                    url=f"{backend.url}/{key}",
                )
            )
        return item.digest, item.size, key, etag

    def _commit_group(
        self, dst: str, group: Any, staged: list[tuple[str, int, str, str | None]]
    ) -> list[tuple[str, int, str, str | None]]:
        """Publish a batch's staged blobs at once, then re-read and re-hash each; return
        the replica rows to record (the names are durable when this returns).

        A blob that re-reads wrong is deleted; then the good ones are recorded here and a
        retryable ``ChecksumMismatch`` naming the bad ones is raised."""
        backend = self.backends[dst]
        with contextlib.ExitStack() as traced:
            # Each object is written (renamed into place) here: trace it under its own key.
            for _digest, _size, key, _etag in staged:
                traced.enter_context(traced_write(f"{dst}:{key}", "blob"))
            with self._throttle_guard(dst):
                infos: Mapping[str, Any] = group.commit_all()
        failpoint("after_commit")

        def check(row: tuple[str, int, str, str | None]) -> str | None:
            digest, size, key, _etag = row
            stored = hash_object(backend, key, size)
            if stored == digest:
                return None
            backend.delete(key)
            return f"{key} at {dst} re-read as {stored}, expected {digest}; deleted"

        ok: list[tuple[str, int, str, str | None]] = []
        wrong: list[str] = []
        for row, problem in zip(staged, self.io.map(check, staged), strict=True):
            if problem is None:
                info = infos.get(row[2])
                ok.append((row[0], row[1], row[2], None if info is None else info.etag))
            else:
                wrong.append(problem)
        if wrong:
            # Record the good ones first: they are verified and durable.
            if ok:
                with write_transaction(self.engine) as conn:
                    SiteIndex.record_many(conn, dst, ok)
            raise _retryable(ChecksumMismatch("; ".join(wrong[:3]), url=backend.url))
        return ok

    # -- chunks -----------------------------------------------------------------------------

    def _open_upload(
        self, dst: str, digest: str, lay: PartPlan
    ) -> tuple[Backend, Writer, set[int]]:
        """Join (or start) the one upload of ``digest`` at ``dst``; return the parts done."""
        backend = self.backends[dst]
        key = blob_key(digest)
        token = self.chunks.upload_for(
            dst,
            digest,
            lay.part_size,
            lay.parts,
            begin=lambda: backend.begin(key, lay.size, lay.part_size).token,
        )
        try:
            writer = backend.begin(key, lay.size, lay.part_size, token=token)
        except (NotFound, ValueError) as exc:
            # The upload vanished (committed, aborted, reaped): start a fresh one next time.
            self.chunks.forget(dst, digest)
            raise TransientError(
                f"upload of {digest} at {dst} was lost ({exc}); restarting it"
            ) from exc
        done = self.chunks.parts_done(dst, digest)
        if backend.capabilities.lists_parts:
            done |= writer.durable_parts()
        return backend, writer, done

    def _send_parts(
        self,
        p: Mapping[str, Any],
        lay: PartPlan,
        writer: Writer,
        parts: Sequence[int],
        cancel: threading.Event,
        *,
        record: bool = True,
    ) -> int:
        """Send ``parts`` (each verified chunk by chunk before it is written)."""
        dst, digest = str(p["dst_site"]), str(p["digest"])
        chunk_digests: Sequence[str] = p["chunk_digests"]
        src = SourceReplica(str(p["src_site"]), str(p["src_key"]), p.get("src_etag"), lay.size)
        key = blob_key(digest)

        def one(j: int) -> int:
            self._check(cancel)
            length = lay.part_length(j)

            def check(data: memoryview) -> str | None:
                for i in lay.chunks_of(j):
                    start = (i - j * lay.k) * lay.chunk_size
                    got = digest_bytes(data[start : start + lay.chunk_size])
                    if got != chunk_digests[i]:
                        return f"chunk {i} hashed to {got}, expected {chunk_digests[i]}"
                return None

            def write(_src: SourceReplica, data: memoryview) -> int:
                with traced_write(f"{dst}:{key}#{j}", "part"):
                    writer.put_part(j, data)
                return len(data)

            with self.buffers.lease(length) as buf, memoryview(buf) as whole:
                mem = whole[:length]
                n = self._throttle_retry(
                    lambda: self._verified_range(
                        dst, src, digest, j * lay.part_size, mem, check, write
                    )
                )
            failpoint("after_put_part")
            if record:
                self.chunks.mark_part(dst, digest, j)
                failpoint("after_mark_part")
            return n

        futures = [self.io.submit(one, j) for j in parts]
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

    def _chunks(self, p: Mapping[str, Any], cancel: threading.Event) -> int:
        dst, digest = str(p["dst_site"]), str(p["digest"])
        if self.index.has(dst, digest):
            return 0
        lay = part_plan(self.backends[dst], int(p["size"]), int(p["chunk_size"]))
        if lay.parts <= 1:
            return 0  # a one-part object is not durable before commit: finalize writes it
        owned = lay.parts_starting_in(int(p["first"]), int(p["last"]))
        _backend, writer, done = self._open_upload(dst, digest, lay)
        try:
            return self._send_parts(p, lay, writer, [j for j in owned if j not in done], cancel)
        finally:
            _close_writer(writer)

    # -- finalize ---------------------------------------------------------------------------

    def _finalize(self, p: Mapping[str, Any], task: ClaimedTask, cancel: threading.Event) -> int:
        dst, digest, size = str(p["dst_site"]), str(p["digest"]), int(p["size"])
        key = blob_key(digest)
        if self.index.has(dst, digest):
            return 0
        if self._adopt(dst, digest, size, key):  # committed by a worker killed right after
            self.chunks.forget(dst, digest)
            return 0
        backend = self.backends[dst]
        lay = part_plan(backend, size, int(p["chunk_size"]))
        if lay.parts <= 1:
            writer = backend.begin(key, size, lay.part_size)
        else:
            backend, writer, done = self._open_upload(dst, digest, lay)
        try:
            if lay.parts <= 1:
                moved = self._send_parts(p, lay, writer, [0], cancel, record=False)
            else:
                missing = [j for j in range(lay.parts) if j not in done]
                moved = self._send_parts(p, lay, writer, missing, cancel) if missing else 0
            self._check(cancel)
            failpoint("before_commit")
            with traced_write(f"{dst}:{key}", "commit"), self._throttle_guard(dst):
                info = writer.commit()
        except BaseException:
            if lay.parts <= 1:  # an unrecorded one-part upload: nobody can resume it
                with contextlib.suppress(StorageError):
                    writer.abort()
            raise
        finally:
            _close_writer(writer)  # after commit a no-op; otherwise the retry resumes it
        failpoint("after_commit")
        stored = hash_object(backend, key, size, buffers=self.buffers)
        if stored != digest:
            backend.delete(key)
            self.chunks.forget(dst, digest)
            mismatch = ChecksumMismatch(
                f"{key} at {dst} re-read after commit as {stored}, expected {digest}; "
                f"deleted, upload restarted",
                url=f"{backend.url}/{key}",
            )
            if task.attempts >= task.max_attempts:
                self.index.mark_bad(
                    str(p["src_site"]),
                    digest,
                    str(p["src_key"]),
                    f"every chunk matched but the whole object hashed to {stored} on "
                    f"{task.attempts} attempts at {dst}",
                )
                raise mismatch
            raise _retryable(mismatch)
        self.index.record(dst, digest, size, key, etag=info.etag)
        self.chunks.forget(dst, digest)
        return moved

    # -- publish ----------------------------------------------------------------------------

    def publish(self, placement_id: int) -> PublishResult:
        """Build the view of a placement's version at its site (idempotent)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(_PL.c.dataset, _PL.c.version_id, _PL.c.site).where(
                    _PL.c.id == placement_id
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"placement {placement_id} does not exist")
        dataset, version_id, site = str(row[0]), str(row[1]), str(row[2])
        version = self.manifests.resolve(f"{dataset}@{version_id}")
        backend = self.backends[site]

        def files() -> Iterator[ViewFile]:
            batch: list[tuple[str, str, int]] = []
            for entry in self.manifests.iter_entries(version):
                batch.append((entry.path, entry.digest, entry.size))
                if len(batch) >= _IN_BATCH:
                    yield from self._resolve_keys(site, batch)
                    batch = []
            yield from self._resolve_keys(site, batch)

        result = publish_view(
            backend,
            dataset,
            version_id,
            files,
            labels=version.labels,
            buffers=self.buffers,
        )
        failpoint("after_publish")
        if not version.verified:
            # Every blob was just checked against this manifest's digests at this site.
            self.manifests.mark_verified(version)
        return result

    def _resolve_keys(self, site: str, batch: list[tuple[str, str, int]]) -> Iterator[ViewFile]:
        if not batch:
            return
        digests = sorted({d for _, d, _ in batch})
        keys: dict[str, str] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_R.c.digest, _R.c.key).where(
                    _R.c.site == site, _R.c.state == "ok", _R.c.digest.in_(digests)
                )
            )
            for digest, key in rows:
                # The blob store key wins over a registration source's path.
                if digest not in keys or str(key).startswith(".datasync/blobs/"):
                    keys[digest] = str(key)
        for path, digest, size in batch:
            key = keys.get(digest)
            if key is None:
                raise NotFound(
                    f"cannot publish: blob {digest} of {path} is not a replica at {site}"
                )
            yield ViewFile(path, digest, size, key)
