"""The site index and the chunk map on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

from sqlalchemy.engine import Engine

from datasync.transfer.siteindex import ChunkMap, SiteIndex, SourceReplica

D1 = "xxh3-128:" + "1" * 32
D2 = "xxh3-128:" + "2" * 32


def test_record_has_sources_and_mark_bad(engine: Engine) -> None:
    index = SiteIndex(engine)
    assert not index.has("aws", D1)
    index.record("aws", D1, 10, "runs/a.bin", etag="e1")
    index.record("aws", D1, 10, "runs/a.bin", etag="e1")  # idempotent
    index.record("gaggle", D1, 10, ".datasync/blobs/11/11/" + "1" * 32)
    index.record("gaggle", D1, 10, "drive/x/a.bin")
    assert index.has("aws", D1) and index.has("gaggle", D1) and not index.has("aws", D2)
    assert index.key_for("gaggle", D1) == ".datasync/blobs/11/11/" + "1" * 32
    assert index.sources_for(D1, exclude_site="gaggle") == [
        SourceReplica("aws", "runs/a.bin", "e1", 10)
    ]
    assert len(index.sources_for(D1)) == 3
    index.mark_bad("aws", D1, "runs/a.bin", "checksum mismatch: got xxh3-128:ff..")
    assert not index.has("aws", D1)
    assert [s.site for s in index.sources_for(D1)] == ["gaggle", "gaggle"]
    # Re-verified bytes make it ok again, with the new etag.
    index.record("aws", D1, 10, "runs/a.bin", etag="e2")
    assert index.sources_for(D1, exclude_site="gaggle")[0].etag == "e2"


def test_upload_for_begins_once_among_racing_workers(engine: Engine) -> None:
    chunks = ChunkMap(engine)
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
    chunks = ChunkMap(engine)
    assert chunks.mark_part("aws", D1, 0) is False  # no upload: nothing to record
    chunks.upload_for("aws", D1, 4096, 3, lambda: "tok")
    assert chunks.mark_part("aws", D1, 2) is True
    assert chunks.mark_part("aws", D1, 0) is True
    assert chunks.mark_part("aws", D1, 0) is True  # idempotent
    assert chunks.parts_done("aws", D1) == {0, 2}
    assert chunks.parts_done("aws", D2) == set()
    # Same layout: the same upload is joined. Another layout replaces it and its parts.
    assert chunks.upload_for("aws", D1, 4096, 3, lambda: "never") == "tok"
    assert chunks.upload_for("aws", D1, 8192, 2, lambda: "tok2") == "tok2"
    assert chunks.parts_done("aws", D1) == set()
    chunks.mark_part("aws", D1, 1)
    chunks.forget("aws", D1)
    assert chunks.current("aws", D1) is None
    assert chunks.parts_done("aws", D1) == set()
