"""The site index and the chunk map on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from datasync.events import BlobReplicated, ChunkVerified, EventBus, ReplicaMarkedBad
from datasync.models import ReplicaKind
from datasync.transfer.siteindex import BlobRow, SiteIndex, SourceReplica
from datasync.transfer.state import DEFAULT_RECHECK, ReplicaRow
from tests.fixtures.transfer import Recorder, make_state

D1 = "xxh3-128:" + "1" * 32
D2 = "xxh3-128:" + "2" * 32


def test_blob_and_source_replicas_bad_ones_and_their_recheck(engine: Engine) -> None:
    recorder = Recorder()
    bus = EventBus()
    bus.subscribe(recorder)
    state = make_state(engine, bus)
    index = SiteIndex(engine)
    blob = ".datasync/blobs/11/11/" + "1" * 32
    assert not index.has("aws", D1)
    state.replicas.record("aws", [ReplicaRow(D1, 10, "runs/a.bin", "e1")], kind=ReplicaKind.SOURCE)
    state.replicas.record("gaggle", [ReplicaRow(D1, 10, blob, None)])
    state.replicas.record("gaggle", [ReplicaRow(D1, 10, blob, None)])  # idempotent
    # Only blob-store rows make a blob "present" at a site; a source row does not.
    assert index.has("gaggle", D1) and not index.has("aws", D1)
    assert index.blobs("gaggle", [D1, D2]) == {D1: BlobRow(blob, 10, None)}
    assert [e.site for e in recorder.of(BlobReplicated)] == ["gaggle", "gaggle"]
    # A destination's own blob store is never its source; its registration sources are.
    assert index.sources_for(D1, dst="gaggle") == [
        SourceReplica("aws", "runs/a.bin", "e1", ReplicaKind.SOURCE)
    ]
    assert [s.site for s in index.sources_for(D1, dst="aws")] == ["aws", "gaggle"]
    state.replicas.mark_bad("aws", D1, "runs/a.bin", "checksum mismatch: got xxh3-128:ff..")
    assert recorder.of(ReplicaMarkedBad)[0].reason.startswith("checksum mismatch")
    assert index.sources_for(D1, dst="gaggle") == []
    # Bad is not forever: once its re-check time has come it is offered again, last.
    later = datetime.now(UTC) + DEFAULT_RECHECK + timedelta(seconds=1)
    (again,) = index.sources_for(D1, dst="gaggle", now=later)
    assert (again.site, again.ok) == ("aws", False)
    assert state.replicas.restore("aws", D1, "runs/a.bin") is True
    assert index.sources_for(D1, dst="gaggle")[0].ok
    assert state.replicas.restore("aws", D1, "runs/a.bin") is False  # already ok


def test_sources_for_many_answers_each_digest_like_sources_for(engine: Engine) -> None:
    state = make_state(engine)
    index = SiteIndex(engine)
    D3 = "xxh3-128:" + "3" * 32
    state.replicas.record("aws", [ReplicaRow(D1, 1, "a/1", "e1")], kind=ReplicaKind.SOURCE)
    state.replicas.record(
        "gaggle", [ReplicaRow(D1, 1, "b/1", None), ReplicaRow(D2, 2, "b/2", None)]
    )
    state.replicas.record("lustre", [ReplicaRow(D2, 2, "c/2", None)])
    state.replicas.mark_bad("gaggle", D1, "b/1", "wrong bytes")
    later = datetime.now(UTC) + DEFAULT_RECHECK + timedelta(seconds=1)
    for dst in ("lustre", "gaggle", "aws"):
        for now in (None, later):
            many = index.sources_for_many([D1, D2, D3], dst=dst, now=now)
            for d in (D1, D2, D3):
                assert many.get(d, []) == index.sources_for(d, dst=dst, now=now), (dst, now, d)
    many = index.sources_for_many([D1, D2, D3], dst="lustre")
    assert {d: [r.site for r in rows] for d, rows in many.items()} == {
        D1: ["aws"],  # gaggle's copy is bad
        D2: ["gaggle"],  # lustre's own blob store is never its source
    }
    # The bad gaggle copy of D1 comes back after its re-check time, last.
    assert [(r.site, r.ok) for r in index.sources_for_many([D1], dst="lustre", now=later)[D1]] == [
        ("aws", True),
        ("gaggle", False),
    ]
    assert D3 not in index.sources_for_many([D3], dst="lustre")


def test_upload_for_begins_once_among_racing_workers(engine: Engine) -> None:
    chunks = make_state(engine).uploads
    calls: list[int] = []
    tokens: list[str] = []
    lock = threading.Lock()

    def begin() -> str:
        with lock:
            calls.append(1)
        time.sleep(0.05)  # widen the race window: a slow CreateMultipartUpload
        return f"upload-{len(calls)}"

    def worker() -> None:
        token = chunks.upload_for("aws", D1, 4096, 3, begin)
        with lock:
            tokens.append(token)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert tokens == ["upload-1"] * 6
    assert chunks.current("aws", D1) is not None


def test_parts_are_recorded_per_upload_and_forgotten(engine: Engine) -> None:
    recorder = Recorder()
    bus = EventBus()
    bus.subscribe(recorder)
    chunks = make_state(engine, bus).uploads
    assert chunks.mark_part("aws", D1, 0, "tok") is False  # no upload: nothing to record
    chunks.upload_for("aws", D1, 4096, 3, lambda: "tok")
    assert chunks.mark_part("aws", D1, 2, "tok", "md5-2") is True
    assert chunks.mark_part("aws", D1, 0, "tok", "md5-0") is True
    assert chunks.mark_part("aws", D1, 0, "tok", "md5-0") is True  # idempotent
    assert chunks.parts_done("aws", D1) == {0, 2}
    assert chunks.part_proofs("aws", D1) == {0: "md5-0", 2: "md5-2"}
    assert [e.part for e in recorder.of(ChunkVerified)] == [2, 0, 0]
    assert chunks.parts_done("aws", D2) == set()
    # A part sent again keeps its proof only if both sends showed the same: the store
    # holds whichever send came last, which need not be the last one recorded.
    assert chunks.mark_part("aws", D1, 2, "tok", "other") is True
    assert chunks.mark_part("aws", D1, 2, "tok", "md5-2") is True
    assert chunks.part_proofs("aws", D1) == {0: "md5-0"}
    assert chunks.parts_done("aws", D1) == {0, 2}  # done still, proved no more
    # Same layout: the same upload is joined. Another layout replaces it and its parts.
    assert chunks.upload_for("aws", D1, 4096, 3, lambda: "never") == "tok"
    assert chunks.upload_for("aws", D1, 8192, 2, lambda: "tok2") == "tok2"
    assert chunks.parts_done("aws", D1) == set()
    # A stalled task of the replaced upload marks its part late: nothing is recorded.
    assert chunks.mark_part("aws", D1, 1, "tok", "md5-1") is False
    assert chunks.parts_done("aws", D1) == set()
    assert chunks.mark_part("aws", D1, 1, "tok2") is True
    assert chunks.part_proofs("aws", D1) == {}
    marked = len(recorder.of(ChunkVerified))
    assert chunks.mark_part("aws", D1, 1, "tok", "md5-1") is False  # even where it is done
    assert len(recorder.of(ChunkVerified)) == marked
    chunks.forget("aws", D1)
    assert chunks.current("aws", D1) is None
    assert chunks.parts_done("aws", D1) == set()
