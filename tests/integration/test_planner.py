"""The planner on SQLite and PostgreSQL: chunk tasks for big blobs, batches of small
blobs, dedupe within and across versions, source choice, bounded pages, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from datasync.config import Settings
from datasync.db.engine import write_transaction
from datasync.transfer.layout import blob_key
from datasync.transfer.payloads import (
    BlobItem,
    BlobsPayload,
    ChunksPayload,
    FinalizePayload,
    PublishPayload,
    SourceRef,
)
from datasync.transfer.planner import PlannerConfig
from tests.fixtures.transfer import (
    MIB,
    add_placement,
    fake_entry,
    make_state,
    payload_of,
    placement_row,
    record_blobs,
    record_sources,
    register,
    settings_with,
    tasks_of,
    version_pk,
)
from tests.fixtures.transfer import plan as plan_placement

SRC = "memory://plan-src/data"


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return settings_with(
        tmp_path,
        db_url,
        {"src": "memory://plan-src/data", "alt": "memory://plan-alt", "dst": "memory://plan-dst"},
        src={"dst": 0.09},
        alt={"dst": 0.01},
    )


def _kinds(engine: Engine, placement: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in tasks_of(engine, placement):
        out[row.kind] = out.get(row.kind, 0) + 1
    return out


def _items(engine: Engine, placement: int) -> list[BlobItem]:
    return [
        item
        for row in tasks_of(engine, placement)
        if row.kind == "blobs"
        for item in _blobs(row).items
    ]


def _blobs(row: object) -> BlobsPayload:
    payload = payload_of(row)
    assert isinstance(payload, BlobsPayload)
    return payload


def test_big_blobs_get_chunk_tasks_and_small_blobs_are_batched(
    engine: Engine, settings: Settings
) -> None:
    big = fake_entry("shard-000.tar", "big", 11 * MIB + 1)  # 12 chunks of 1 MiB
    small = [fake_entry(f"frames/{i:05d}.jpg", f"f{i}", 20_000) for i in range(600)]
    version = register(engine, "drive/plan", [big, *small], source=SRC)
    record_sources(engine, settings, version_pk(engine, version), SRC)
    placement = add_placement(engine, version, state="PLANNING")

    result = plan_placement(engine, settings, placement, PlannerConfig(chunks_per_task=4))

    assert result.state == "TRANSFERRING"
    assert result.blobs == 601
    assert result.tasks == {"publish": 1, "finalize": 1, "chunks": 3, "blobs": 3}
    rows = tasks_of(engine, placement)
    publish = next(r for r in rows if r.kind == "publish")
    finalize = next(r for r in rows if r.kind == "finalize")
    chunks = sorted((r for r in rows if r.kind == "chunks"), key=lambda r: r.payload["first"])
    batches = [r for r in rows if r.kind == "blobs"]
    assert publish.blocked_by == 1 + len(batches)  # finalize + 3 batches
    pub = payload_of(publish)
    assert isinstance(pub, PublishPayload) and pub.placement_id == placement
    fin = payload_of(finalize)
    assert isinstance(fin, FinalizePayload)
    assert finalize.parent_id == publish.id and finalize.blocked_by == 3
    assert fin.blob.chunk_digests == big.chunks
    assert fin.blob.src == SourceRef("src", "shard-000.tar", None)
    ranges = [payload_of(c) for c in chunks]
    assert all(isinstance(c, ChunksPayload) and c.blob == fin.blob for c in ranges)
    assert [(c.first, c.last) for c in ranges if isinstance(c, ChunksPayload)] == [
        (0, 4),
        (4, 8),
        (8, 12),
    ]
    assert fin.blob.digest == big.digest and fin.blob.size == big.size
    assert fin.blob.chunk_size == MIB and fin.blob.dst_site == "dst"
    assert all(c.parent_id == finalize.id for c in chunks)
    assert sum(c.bytes for c in chunks) == big.size  # progress adds up to the file
    assert sorted(len(_blobs(b).items) for b in batches) == [88, 256, 256]
    assert all(b.parent_id == publish.id for b in batches)
    keys = {item.src.key for item in _items(engine, placement)}
    assert keys == {e.path for e in small}
    prow = placement_row(engine, placement)
    assert prow.state == "TRANSFERRING"
    assert (prow.files_total, prow.bytes_total) == (601, big.size + 600 * 20_000)
    assert (prow.files_done, prow.bytes_done) == (0, 0)


def test_batches_close_at_the_byte_limit(engine: Engine, settings: Settings) -> None:
    entries = [fake_entry(f"f{i}", f"s{i}", 300) for i in range(10)]
    version = register(engine, "drive/bytes", entries)
    record_sources(engine, settings, version_pk(engine, version), SRC)
    placement = add_placement(engine, version, state="PLANNING")
    plan_placement(engine, settings, placement, PlannerConfig(batch_bytes=1000))
    sizes = sorted(len(_blobs(r).items) for r in tasks_of(engine, placement) if r.kind == "blobs")
    assert sizes == [2, 4, 4]


def test_one_digest_under_many_paths_is_one_blob(engine: Engine, settings: Settings) -> None:
    same = [fake_entry(f"copy{i}/a.bin", "same-bytes", 5000) for i in range(3)]
    other = fake_entry("b.bin", "other", 7)
    version = register(engine, "drive/dupes", [*same, other])
    record_sources(engine, settings, version_pk(engine, version), SRC)
    placement = add_placement(engine, version, state="PLANNING")
    result = plan_placement(engine, settings, placement)
    assert result.blobs == 2
    (batch,) = [r for r in tasks_of(engine, placement) if r.kind == "blobs"]
    assert sorted(i.digest for i in _blobs(batch).items) == sorted([same[0].digest, other.digest])
    assert (batch.files, batch.bytes) == (4, 3 * 5000 + 7)


def test_second_version_plans_only_changed_blobs(engine: Engine, settings: Settings) -> None:
    v1_entries = [fake_entry(f"f{i:03d}", f"v1-{i}", 1000 + i) for i in range(50)]
    v1 = register(engine, "drive/inc", v1_entries)
    # v1 is already at dst (its blob store keys), as after a finished replication.
    record_blobs(engine, "dst", v1_entries)
    changed = {3, 17, 42}
    v2_entries = [
        fake_entry(e.path, f"v2-{i}", 2000) if i in changed else e for i, e in enumerate(v1_entries)
    ]
    v2_entries.append(fake_entry("new.bin", "brand-new", 10))
    v2_entries.append(fake_entry("renamed-copy", "v1-7", 1007))  # old bytes, new path
    v2 = register(engine, "drive/inc", v2_entries)
    assert v2.version_id != v1.version_id
    record_sources(engine, settings, version_pk(engine, v2), SRC)
    placement = add_placement(engine, v2, state="PLANNING")

    result = plan_placement(engine, settings, placement)

    moved = {item.digest for item in _items(engine, placement)}
    expected = {v2_entries[i].digest for i in changed} | {v2_entries[50].digest}
    assert moved == expected
    assert result.bytes_to_move == 3 * 2000 + 10
    prow = placement_row(engine, placement)
    assert prow.files_total == 52
    assert prow.files_done == 52 - 4  # 47 unchanged + the renamed copy are present
    assert prow.bytes_done == sum(e.size for e in v2_entries) - 3 * 2000 - 10


def test_planner_reads_bounded_pages(engine: Engine, settings: Settings) -> None:
    entries = [fake_entry(f"p/{i:04d}", f"page-{i}", 100) for i in range(100)]
    version = register(engine, "drive/pages", entries)
    record_sources(engine, settings, version_pk(engine, version), SRC)
    placement = add_placement(engine, version, state="PLANNING")
    result = plan_placement(engine, settings, placement, PlannerConfig(page_size=7, batch_items=10))
    assert result.pages == 15  # ceil(100 / 7)
    assert result.max_page_rows == 7
    assert result.blobs == 100
    assert len(_items(engine, placement)) == 100
    assert len({i.digest for i in _items(engine, placement)}) == 100


def test_cheapest_configured_source_wins(engine: Engine, settings: Settings) -> None:
    a, b = fake_entry("a", "a", 10), fake_entry("b", "b", 10)
    version = register(engine, "drive/src", [a, b])
    record_sources(engine, settings, version_pk(engine, version), SRC)
    record_blobs(engine, "alt", [a], a="e1")
    record_blobs(engine, "elsewhere", [b])  # not a configured site: never a source
    placement = add_placement(engine, version, state="PLANNING")
    plan_placement(engine, settings, placement)
    chosen = {i.digest: i.src for i in _items(engine, placement)}
    assert chosen[a.digest] == SourceRef("alt", blob_key(a.digest), "e1")  # 0.01 < 0.09
    assert chosen[b.digest] == SourceRef("src", "b", None)
    # A bad replica is not chosen while a good one exists.
    make_state(engine).replicas.mark_bad("alt", a.digest, blob_key(a.digest), "checksum mismatch")
    with write_transaction(engine) as conn:
        conn.exec_driver_sql(f"UPDATE placements SET state = 'PLANNING' WHERE id = {placement}")
    plan_placement(engine, settings, placement)
    assert {i.digest: i.src.site for i in _items(engine, placement)}[a.digest] == "src"


def test_blob_without_source_fails_the_placement_with_reason(
    engine: Engine, settings: Settings
) -> None:
    version = register(engine, "drive/nosrc", [fake_entry("x/y.bin", "orphan", 10)])
    placement = add_placement(engine, version, state="PLANNING")
    result = plan_placement(engine, settings, placement)
    assert result.state == "FAILED" and result.no_source == 1
    prow = placement_row(engine, placement)
    assert prow.state == "FAILED"
    assert "1 blob(s) have no usable replica" in prow.error and "x/y.bin" in prow.error
    assert make_state(engine).tasks.claim("w", 10, 60) == []


def test_nothing_missing_still_publishes(engine: Engine, settings: Settings) -> None:
    entries = [fake_entry("a", "a", 10), fake_entry("b", "b", 20)]
    version = register(engine, "drive/present", entries)
    record_blobs(engine, "dst", entries)
    placement = add_placement(engine, version, state="PLANNING")
    result = plan_placement(engine, settings, placement)
    assert result.tasks == {"publish": 1} and result.blobs == 0
    queue = make_state(engine).tasks
    (task,) = queue.claim("w", 10, 60)
    assert task.kind == "publish"
    assert payload_of(task) == PublishPayload(placement, "dst", "drive/present", version.version_id)
    assert queue.complete("w", task.id)
    prow = placement_row(engine, placement)
    assert prow.state == "READY" and (prow.files_done, prow.bytes_done) == (2, 30)


def test_replanning_replaces_tasks(engine: Engine, settings: Settings) -> None:
    entries = [fake_entry(f"f{i}", f"r{i}", 10) for i in range(5)]
    version = register(engine, "drive/replan", entries)
    record_sources(engine, settings, version_pk(engine, version), SRC)
    placement = add_placement(engine, version, state="PLANNING")
    plan_placement(engine, settings, placement)
    first = _kinds(engine, placement)
    record_blobs(engine, "dst", entries[:1])
    plan_placement(engine, settings, placement)
    assert _kinds(engine, placement) == first == {"publish": 1, "blobs": 1}
    assert len(_items(engine, placement)) == 4
