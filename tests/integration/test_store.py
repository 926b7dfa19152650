"""The manifest store against SQLite and the real PostgreSQL (``db_url`` runs both).

Pins invariant 1 (a sealed version never changes; identical content, identical id),
label and reference resolution, diff, export, and that a rejected registration leaves
every table as it was.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from datasync.db.engine import create_engine
from datasync.db.migrate import current_revision, head_revision, upgrade_to_head
from datasync.errors import InvalidManifest, UnknownReference, UserError
from datasync.manifest.bulk import BATCH_ROWS
from datasync.manifest.canonical import path_sort_key, read_canonical, version_id
from datasync.manifest.store import ManifestStore
from datasync.models import FileEntry, ManifestHeader
from tests.integration.manifest_helpers import TABLES, counts, digest_of, entries

MiB = 1024 * 1024
HEADER = ManifestHeader(chunk_size=MiB)


@pytest.fixture
def store(db_url: str) -> Iterator[ManifestStore]:
    engine = create_engine(db_url)
    upgrade_to_head(engine)
    yield ManifestStore(engine)
    engine.dispose()


def test_migrations_reach_head_and_match_the_tables(store: ManifestStore) -> None:
    assert current_revision(store.engine) == head_revision()
    upgrade_to_head(store.engine)  # idempotent
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    # Only this migration's tables; later migrations pin their own.
    ours = [d for d in diffs if any(f"'{t}'" in repr(d) for t in TABLES)]
    assert ours == []


def test_registering_identical_content_twice_returns_the_same_id_and_creates_nothing(
    store: ManifestStore, db_url: str
) -> None:
    first = store.register("drive/a", HEADER, entries(50))
    assert first.created
    assert first.summary.version_id == version_id(HEADER, entries(50))
    assert (first.summary.files, first.summary.bytes) == (50, sum(range(50)))
    before = counts(db_url)
    again = store.register("drive/a", HEADER, reversed(entries(50)))
    assert not again.created
    assert again.summary.version_id == first.summary.version_id
    assert counts(db_url) == before


def test_entry_order_does_not_change_the_id(store: ManifestStore) -> None:
    sorted_entries = entries(300)
    shuffled = sorted_entries[::7] + [e for i, e in enumerate(sorted_entries) if i % 7]
    a = store.register("drive/a", HEADER, sorted_entries)
    b = store.register("drive/b", HEADER, shuffled)
    assert a.summary.version_id == b.summary.version_id == version_id(HEADER, sorted_entries)


def test_chunk_size_is_part_of_the_id(store: ManifestStore) -> None:
    a = store.register("drive/a", HEADER, entries(3))
    b = store.register("drive/a", ManifestHeader(chunk_size=2 * MiB), entries(3))
    assert b.created and a.summary.version_id != b.summary.version_id
    assert store.resolve("drive/a@latest").chunk_size == 2 * MiB


@pytest.mark.parametrize("ordered", [True, False], ids=["sorted-input", "unsorted-input"])
def test_duplicate_paths_are_rejected_and_nothing_changes(
    store: ManifestStore, db_url: str, ordered: bool
) -> None:
    store.register("drive/a", HEADER, entries(5))
    before = counts(db_url)
    dup = FileEntry("f/000003.bin", 9, digest_of(9))
    bad = [*entries(5), dup]  # out of order: found by the primary key
    if ordered:  # canonical order, the twin right after its twin: found while streaming
        bad.sort(key=lambda e: path_sort_key(e.path))
    with pytest.raises(InvalidManifest, match=r"duplicate path 'f/000003.bin'"):
        store.register("drive/a", HEADER, bad, labels=["v9"])
    with pytest.raises(InvalidManifest, match="duplicate path"):
        store.register("drive/new", HEADER, bad)
    assert counts(db_url) == before


def test_large_unordered_input_and_far_apart_duplicates(store: ManifestStore, db_url: str) -> None:
    many = entries(BATCH_ROWS + 5000)
    # Disorder only in the last batch: earlier batches already sit in the table.
    late = store.register("drive/a", HEADER, [*many[1:], many[0]])
    assert late.summary.version_id == version_id(HEADER, many)
    before = counts(db_url)
    twin = FileEntry(many[10].path, 1, digest_of(1))
    with pytest.raises(InvalidManifest, match=f"duplicate path '{many[10].path}'"):
        store.register("drive/b", HEADER, [*many, twin])
    assert counts(db_url) == before


def test_paths_are_ordered_bytewise_on_every_engine(store: ManifestStore) -> None:
    names = ["Z", "a0", "a.txt", "a/x", "a b", "é", "z", "日本/x", "😀", "e\u0301x"]
    given = [FileEntry(n, 1, digest_of(i)) for i, n in enumerate(names)]
    reg = store.register("drive/a", HEADER, given)
    got = [e.path for e in store.iter_entries(reg.summary)]
    assert got == sorted(names, key=path_sort_key)
    assert reg.summary.version_id == version_id(HEADER, [given[names.index(p)] for p in got])
    # The diff streams in the same bytewise order (SQL on PostgreSQL, a merge on SQLite).
    first = store.register("drive/a", HEADER, given[:1]).summary
    added = [c.path for c in store.diff(first, reg.summary)]
    assert added == [p for p in got if p != names[0]]


def test_latest_moves_to_every_new_version_and_labels_are_movable(store: ManifestStore) -> None:
    v1 = store.register("drive/a", HEADER, entries(3), labels=["v1"]).summary
    v2 = store.register("drive/a", HEADER, entries(4), labels=["v2"]).summary
    assert store.resolve("drive/a").version_id == v2.version_id
    assert store.resolve("drive/a@latest").labels == ("latest", "v2")
    assert store.resolve("drive/a@v1").version_id == v1.version_id
    moved = store.set_label(f"drive/a@{v1.version_id}", "stable")
    assert moved.labels == ("stable", "v1")
    store.set_label("drive/a@v2", "stable")
    assert store.resolve("drive/a@stable").version_id == v2.version_id
    # Re-registering old content creates nothing and does not move latest...
    again = store.register("drive/a", HEADER, entries(3))
    assert not again.created
    assert store.resolve("drive/a@latest").version_id == v2.version_id
    # ...but an explicitly requested label does move.
    store.register("drive/a", HEADER, entries(3), labels=["v1-again"])
    assert store.resolve("drive/a@v1-again").version_id == v1.version_id
    assert [v.version_id for v in store.list_versions("drive/a")] == [
        v2.version_id,
        v1.version_id,
    ]


def test_refs_resolve_full_ids_and_unique_prefixes(store: ManifestStore) -> None:
    v = store.register("drive/a", HEADER, entries(3)).summary
    assert store.resolve(f"drive/a@{v.version_id}") == v
    assert store.resolve(f"drive/a@{v.version_id[:8]}") == v
    with pytest.raises(UnknownReference, match="unknown dataset 'drive/nope'"):
        store.resolve("drive/nope@latest")
    with pytest.raises(UnknownReference, match=r"no label or version id 'v7'.*labels: latest"):
        store.resolve("drive/a@v7")
    with pytest.raises(UnknownReference, match="no label or version id"):
        store.resolve("drive/a@" + "0" * 64)
    with pytest.raises(UnknownReference):
        store.resolve("drive/a@")
    with pytest.raises(UserError, match="invalid dataset name"):
        store.resolve("Drive/A@latest")


def test_an_ambiguous_prefix_lists_the_candidates(store: ManifestStore) -> None:
    # Find two one-file manifests whose ids share 4 hex digits (birthday: ~300 tries).
    seen: dict[str, list[FileEntry]] = {}
    for i in range(100_000):
        e = [FileEntry("x", i, digest_of(i))]
        prefix = version_id(HEADER, e)[:4]
        if prefix in seen:
            a = store.register("drive/a", HEADER, seen[prefix]).summary
            b = store.register("drive/a", HEADER, e).summary
            break
        seen[prefix] = e
    with pytest.raises(UnknownReference, match="ambiguous") as info:
        store.resolve(f"drive/a@{prefix}")
    assert a.version_id[:16] in str(info.value) and b.version_id[:16] in str(info.value)
    assert store.resolve(f"drive/a@{a.version_id[:12]}").version_id == a.version_id


def test_diff_reports_added_removed_and_changed(store: ManifestStore) -> None:
    old = entries(10)
    new = [e for e in old if e.path != "f/000002.bin"]
    new[4] = FileEntry(new[4].path, 4242, digest_of(4242))
    new.append(FileEntry("g/new.bin", 7, digest_of(7)))
    a = store.register("drive/a", HEADER, old).summary
    b = store.register("drive/a", HEADER, new).summary
    changes = list(store.diff(a, b))
    assert [(c.kind, c.path) for c in changes] == [
        ("removed", "f/000002.bin"),
        ("changed", new[4].path),
        ("added", "g/new.bin"),
    ]
    assert changes[1].old_size == 5 and changes[1].new_size == 4242
    assert list(store.diff(a, a)) == []


def test_export_round_trips_to_the_same_id(store: ManifestStore) -> None:
    big = FileEntry(
        "shards/big.tar", 3 * MiB + 1, digest_of(1), tuple(digest_of(i) for i in range(4))
    )
    reg = store.register("drive/a", HEADER, [*entries(20), big]).summary
    out = io.BytesIO()
    store.export(reg, out)
    out.seek(0)
    header, parsed = read_canonical(out)
    assert header == HEADER
    again = store.register("drive/copy", header, parsed, verified=False)
    assert again.created and again.summary.version_id == reg.version_id
    assert not again.summary.verified
    assert big in list(store.iter_entries(again.summary))


def test_unverified_versions_become_verified(store: ManifestStore) -> None:
    reg = store.register("drive/a", HEADER, entries(3), verified=False)
    assert not reg.summary.verified
    assert not store.register("drive/a", HEADER, entries(3), verified=False).summary.verified
    assert store.register("drive/a", HEADER, entries(3), verified=True).summary.verified
    other = store.register("drive/b", HEADER, entries(4), verified=False).summary
    store.mark_verified(other)
    assert store.resolve("drive/b").verified


def test_bad_names_and_labels_are_rejected_before_anything_is_written(
    store: ManifestStore, db_url: str
) -> None:
    before = counts(db_url)
    for name in ["", "Drive/x", "a/b/c/d", "a//b", "/a", "a/", "-a", "a/..", "a b"]:
        with pytest.raises(UserError, match="invalid dataset name"):
            store.register(name, HEADER, entries(1))
    for label in ["", "-x", "a b", "x/y", "a" * 200, "f" * 64]:
        with pytest.raises(UserError, match="invalid label"):
            store.register("drive/a", HEADER, entries(1), labels=[label])
    assert counts(db_url) == before


def test_concurrent_registrations_of_the_same_content_create_one_version(
    store: ManifestStore,
) -> None:
    results: list[bool] = []
    errors: list[BaseException] = []

    def register() -> None:
        try:
            results.append(store.register("drive/race", HEADER, entries(2000)).created)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False, False, True]
    assert len(store.list_versions("drive/race")) == 1


def test_a_failing_entry_stream_rolls_everything_back(store: ManifestStore, db_url: str) -> None:
    store.register("drive/a", HEADER, entries(3))
    before = counts(db_url)

    def broken() -> Iterator[FileEntry]:
        yield from entries(30_000, prefix="g")  # more than one insert batch
        raise InvalidManifest("line 30002: bad digest")

    with pytest.raises(InvalidManifest, match="line 30002"):
        store.register("drive/a", HEADER, broken(), labels=["v2"])
    assert counts(db_url) == before
    with store.engine.connect() as conn:
        pending = sa.text("SELECT count(*) FROM versions WHERE version_id IS NULL")
        assert conn.execute(pending).scalar_one() == 0


def _writes(engine: sa.engine.Engine) -> list[str]:
    """Every statement ``engine`` sends from now on that writes or takes the write lock
    (SQLite's ``BEGIN IMMEDIATE``; a read transaction there is ``BEGIN DEFERRED``)."""
    seen: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def record(_c: object, _cur: object, statement: str, *_args: object) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "PRAGMA", "BEGIN DEFERRED")):
            seen.append(statement)

    return seen


def test_a_known_id_of_a_sealed_version_reads_no_entry_and_writes_nothing(
    store: ManifestStore, db_url: str
) -> None:
    """Invariant 1: an unchanged re-registration (a directory scan knows its id) changes
    nothing, not even a label's timestamp, and does not read its entries."""
    first = store.register("drive/a", HEADER, entries(50), labels=["v1"]).summary

    def unread() -> Iterator[FileEntry]:
        raise AssertionError("the entries of a known version were read")
        yield  # pragma: no cover

    before = counts(db_url)
    writes = _writes(store.engine)
    again = store.register("drive/a", HEADER, unread(), labels=["v1"], version_id=first.version_id)
    assert not again.created and again.summary == first
    assert writes == [] and counts(db_url) == before
    # A label that has to move is still moved (and only then is anything written).
    moved = store.register("drive/a", HEADER, unread(), labels=["v2"], version_id=first.version_id)
    assert moved.summary.labels == ("latest", "v1", "v2") and writes != []


def test_a_verified_registration_of_a_known_unverified_version_marks_it_verified(
    store: ManifestStore,
) -> None:
    first = store.register("drive/a", HEADER, entries(5), verified=False).summary
    assert not first.verified
    again = store.register("drive/a", HEADER, iter(()), version_id=first.version_id)
    assert again.summary.verified and not again.created


def test_a_known_id_not_yet_sealed_is_checked_against_the_entries(
    store: ManifestStore, db_url: str
) -> None:
    good = version_id(HEADER, entries(5))
    made = store.register("drive/a", HEADER, entries(5), version_id=good)
    assert made.created and made.summary.version_id == good
    before = counts(db_url)
    with pytest.raises(RuntimeError, match="is not the id of its entries"):
        store.register("drive/a", HEADER, entries(6), version_id=good[::-1])
    assert counts(db_url) == before
