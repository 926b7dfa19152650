"""Verified reads: bytes from a source replica that match the manifest, or a clear failure.

``VerifiedReader.transfer`` reads a range into a pooled buffer from the first good source
(the planner's choice first, then every other usable replica of the blob), checks it
against the manifest digests BEFORE anything is written, and hands it to ``write`` while
still holding the transfer slots. Invariants:

* Wrong bytes twice in a row from one source (a flipped bit in flight does not condemn
  it), or the object missing there, mark that replica bad with the reason; the next
  source is tried. When none is left: ``ChecksumMismatch`` naming every source and why.
* A bad replica whose re-check time has come is tried last; if it now reads right it is
  ok again (bad is not forever).
* A moved ETag (``SourceChanged``) is re-read unpinned: the digest comparison decides
  whether the new bytes are still the blob.
* Each range holds one concurrency slot at the source, the destination and their link,
  and passes through the bandwidth buckets; given a ``SlotLane`` (a batch of small
  blobs), the lane's slots are used and its bandwidth account charged instead, so the
  host-wide locks are taken once per lane, not once per blob. Retries of each backend call, and the
  throttling feedback to the sites' limits, happen in the retrying backends
  (``datasync.backends.retrying``, wired by the composition root), not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from datasync.errors import ChecksumMismatch, NotFound, SourceChanged
from datasync.manifest.hashing import digest_bytes
from datasync.transfer.exec.context import ExecContext
from datasync.transfer.limits import SlotLane
from datasync.transfer.payloads import SourceRef
from datasync.transfer.readback import read_into
from datasync.transfer.siteindex import SourceReplica

__all__ = ["Check", "VerifiedReader", "whole_check"]

T = TypeVar("T")
# Returns None when the bytes match the manifest, else what is wrong with them.
Check = Callable[[memoryview], str | None]


def whole_check(expected: str) -> Check:
    def check(data: memoryview) -> str | None:
        got = digest_bytes(data)
        return None if got == expected else f"hashed to {got}, expected {expected}"

    return check


class VerifiedReader:
    def __init__(self, ctx: ExecContext) -> None:
        self.ctx = ctx

    def _sources(
        self, first: SourceRef, digest: str, dst: str, known: list[SourceReplica] | None
    ) -> Iterator[SourceReplica]:
        """The payload's source first, then every other usable replica (bad ones last)."""
        seen = {(first.site, first.key)}
        others = known if known is not None else self.ctx.index.sources_for(digest, dst=dst)
        head = next((r for r in others if (r.site, r.key) == (first.site, first.key)), None)
        yield head or SourceReplica(first.site, first.key, first.etag)
        for src in others:
            if (src.site, src.key) not in seen:
                seen.add((src.site, src.key))
                yield src

    def _read_checked(
        self, src: SourceReplica, offset: int, mem: memoryview, check: Check
    ) -> tuple[memoryview, str | None]:
        backend = self.ctx.backends[src.site]
        try:
            got = read_into(backend, src.key, offset, mem, etag=src.etag)
        except SourceChanged:
            got = read_into(backend, src.key, offset, mem, etag=None)
        if len(got) != len(mem):
            return got, f"short read: {len(got)} of {len(mem)} bytes"
        return got, check(got)

    def _slots(
        self, dst: str, src: str, lane: SlotLane | None
    ) -> contextlib.AbstractContextManager[None]:
        if lane is None:
            return self.ctx.limits.slot(dst, src=src)
        lane.hold(dst, src)  # kept after this read: the lane's next blob re-uses it
        return contextlib.nullcontext()

    def transfer(
        self,
        dst: str,
        first: SourceRef,
        digest: str,
        offset: int,
        mem: memoryview,
        check: Check,
        write: Callable[[memoryview], T],
        lane: SlotLane | None = None,
        sources: list[SourceReplica] | None = None,
    ) -> T:
        """Fill ``mem`` from ``offset`` of the first source whose bytes pass ``check``, then
        return ``write(bytes)``, called while the transfer slots are held (the ``lane``'s,
        when given). ``sources``: the blob's usable replicas if the caller already looked
        them up (a batch does, in one query); every read is checked, so a list a few
        seconds old costs at most a wasted read."""
        problems: list[str] = []
        for src in self._sources(first, digest, dst, sources):
            with self._slots(dst, src.site, lane):
                try:
                    got, wrong = self._read_checked(src, offset, mem, check)
                    if wrong:  # once more: a flipped bit in flight does not condemn the source
                        got, wrong = self._read_checked(src, offset, mem, check)
                except NotFound as exc:
                    wrong = f"missing at source: {exc}"
                else:
                    if wrong is None:
                        if not src.ok:
                            self.ctx.state.replicas.restore(src.site, digest, src.key)
                        if lane is None:
                            self.ctx.limits.take_bandwidth(len(got), dst, src=src.site)
                        else:
                            lane.charge(len(got))
                        return write(got)
                    wrong = f"bytes {offset}..{offset + len(mem)}: {wrong} (read twice)"
            self.ctx.state.replicas.mark_bad(src.site, digest, src.key, wrong)
            problems.append(f"{src.site}:{src.key}: {wrong}")
        raise ChecksumMismatch(f"no good source for {digest}: " + "; ".join(problems))
