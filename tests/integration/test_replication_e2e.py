"""End-to-end replication on real servers: register -> replicate -> workers -> view.

Each destination is checked independently of the engine: a POSIX view is hashed by
``xxh128sum``, an object-store view listed and read by the store's own SDK
(``tests/fixtures/rawstore.py``), then compared with the source tree. A second version
moves only the new blobs (bytes counted from the tasks). Chunk size is 1 MiB, so the 2 MiB
and 11 MiB shards become chunk tasks (and on S3, whose parts are >= 5 MiB, multi-chunk
parts).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import sqlalchemy as sa

from datasync.bootstrap import bootstrap
from datasync.db.tables import table_of
from datasync.db.transfer_tables import Replica
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    MIB,
    Site,
    assert_view_matches,
    bytes_moved,
    change_tree,
    cloud_site,
    make_tree,
    new_blob_bytes,
    posix_site,
    seed_cloud_source,
    settings_for,
    task_states,
    upload_tree,
    write_tree,
)
from tests.fixtures.transfer import version_pk

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)
SHARDS = (2 * MIB + 17, 11 * MIB + 3)
DATASET = "drive/tokyo"


def _site(name: str, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Site:
    return posix_site(name, tmp_path / name) if kind == "posix" else cloud_site(name, kind, request)


def _replicate_twice(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    db_url: str,
    src_kind: str,
    dst_kind: str,
    processes: int = 0,
) -> None:
    src = _site("pipeline", src_kind, tmp_path, request)
    dst = _site("lustre", dst_kind, tmp_path, request)
    settings = settings_for(tmp_path / "home", db_url, [src, dst])
    # A POSIX source registers in place; a cloud source gets the same tree uploaded.
    local = (src.root / "run") if src.root is not None else tmp_path / "local"
    files = make_tree(local, shards=SHARDS)
    app = bootstrap(settings)
    try:
        versions = []
        for run, tree in enumerate((files, None), start=1):
            if tree is None:
                tree = change_tree(local, files)
            v = app.service.register_directory(DATASET, local, chunk_size=MIB)
            if src.root is None:
                upload_tree(src.backend(), f"run{run}/", tree)
                pk = version_pk(app.engine, app.store.resolve(f"{DATASET}@{v.version_id}"))
                seed_cloud_source(app, pk, src, f"run{run}")
            placement = app.replication.replicate(f"{DATASET}@{v.version_id}", dst.name)
            run_until_idle(settings, [placement.id], processes=processes, options=FAST)
            st = app.replication.status(placement_id=placement.id)[0]
            assert st.state == "READY", (st.error, st.last_errors)
            assert (st.files_done, st.bytes_done) == (st.files_total, st.bytes_total)
            assert task_states(app.engine, placement.id) == {"done": sum(st.tasks.values())}
            assert_view_matches(dst, DATASET, v.version_id, tree)
            previous = {} if run == 1 else files
            # Only blobs the site did not hold are moved, each exactly once.
            assert bytes_moved(app.engine, placement.id) == new_blob_bytes(previous, tree)
            versions.append((v.version_id, tree))
        # The first view is untouched by the second publish.
        assert_view_matches(dst, DATASET, versions[0][0], versions[0][1])
        if dst.root is not None:
            assert (dst.root / f"{DATASET}@latest").resolve().name == versions[1][0]
    finally:
        app.close()


def test_posix_to_posix(tmp_path: Path, request: pytest.FixtureRequest, db_url: str) -> None:
    _replicate_twice(tmp_path, request, db_url, "posix", "posix")


def test_posix_to_posix_spawned_workers(
    tmp_path: Path, request: pytest.FixtureRequest, pg_url: str
) -> None:
    """The production shape: ``run_worker`` spawning 2 processes on PostgreSQL."""
    _replicate_twice(tmp_path, request, pg_url, "posix", "posix", processes=2)


@pytest.mark.emulator
def test_s3_to_posix(tmp_path: Path, request: pytest.FixtureRequest, db_url: str) -> None:
    _replicate_twice(tmp_path, request, db_url, "s3", "posix")


@pytest.mark.emulator
def test_posix_to_s3(tmp_path: Path, request: pytest.FixtureRequest, db_url: str) -> None:
    _replicate_twice(tmp_path, request, db_url, "posix", "s3")


@pytest.mark.emulator
def test_s3_to_azure(tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str) -> None:
    _replicate_twice(tmp_path, request, sqlite_url, "s3", "azure")


@pytest.mark.emulator
def test_gcs_to_posix(tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str) -> None:
    _replicate_twice(tmp_path, request, sqlite_url, "gcs", "posix")


@pytest.mark.emulator
def test_azure_to_gcs(tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str) -> None:
    _replicate_twice(tmp_path, request, sqlite_url, "azure", "gcs")


# -- bad sources --------------------------------------------------------------------------------

_R = table_of(Replica)


def _replica_states(engine: sa.Engine, site: str) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(_R.c.key, _R.c.state, _R.c.reason).where(_R.c.site == site))
        return {str(k): (str(s), r) for k, s, r in rows}


def test_corrupt_source_is_marked_bad_and_another_used(
    tmp_path: Path, request: pytest.FixtureRequest, db_url: str
) -> None:
    """Invariant 2: bytes that do not hash to the manifest are never written; the source that
    served them is marked bad with the reason, and the other replica is used."""
    cheap = posix_site("cheap", tmp_path / "cheap")
    spare = posix_site("spare", tmp_path / "spare")
    dst = posix_site("lustre", tmp_path / "lustre")
    settings = settings_for(tmp_path / "home", db_url, [cheap, spare, dst])
    settings = settings.model_copy(
        update={
            "sites": {
                "cheap": cheap.config.model_copy(update={"cost_per_gb": {"lustre": 0.0}}),
                "spare": spare.config.model_copy(update={"cost_per_gb": {"lustre": 1.0}}),
                "lustre": dst.config,
            }
        }
    )
    assert cheap.root is not None and spare.root is not None
    files = make_tree(cheap.root / "run", shards=(3 * MIB,))
    write_tree(spare.root / "run", files)
    app = bootstrap(settings)
    try:
        v = app.service.register_directory(DATASET, cheap.root / "run", chunk_size=MIB)
        pk = version_pk(app.engine, app.store.resolve(f"{DATASET}@{v.version_id}"))
        seed_cloud_source(app, pk, spare, "run")
        # Bit rot at the cheap source after registration: a frame and one chunk of the shard.
        frame = cheap.root / "run/cam0/000005.jpg"
        frame.write_bytes(b"\x00" + frame.read_bytes()[1:])
        shard = cheap.root / "run/shards/shard-00.bin"
        with shard.open("r+b") as f:
            f.seek(MIB + 5)
            f.write(b"\xff\xfe")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        run_until_idle(settings, [placement.id], options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        assert_view_matches(dst, DATASET, v.version_id, files)
        states = _replica_states(app.engine, "cheap")
        for key in ("run/cam0/000005.jpg", "run/shards/shard-00.bin"):
            state, reason = states[key]
            assert state == "bad" and reason and "expected" in reason, (key, state, reason)
        assert sum(1 for s, _ in states.values() if s == "bad") == 2
    finally:
        app.close()


def test_only_source_corrupt_fails_with_reason_and_publishes_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst])
    assert src.root is not None and dst.root is not None
    make_tree(src.root / "run")
    app = bootstrap(settings)
    try:
        v = app.service.register_directory(DATASET, src.root / "run", chunk_size=MIB)
        (src.root / "run/cam1/000002.jpg").write_bytes(b"truncated")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        run_until_idle(settings, [placement.id], options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "FAILED"
        assert st.error and "cam1/000002.jpg" in st.error and "short read" in st.error
        assert not (dst.root / DATASET / v.version_id).exists(), "no partial view"
        bad = _replica_states(app.engine, "pipeline")["run/cam1/000002.jpg"]
        assert bad[0] == "bad"
    finally:
        app.close()


def test_source_names_stored_decomposed_on_disk(tmp_path: Path, sqlite_url: str) -> None:
    """A file named in NFD on disk (as macOS tools write them) is recorded under its NFC
    path (docs/manifest-format.md); the POSIX source still finds it when replicating."""
    src = posix_site("pipeline", tmp_path / "pipeline")
    dst = posix_site("lustre", tmp_path / "lustre")
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst])
    nfd = unicodedata.normalize("NFD", "café/crème brûlée.bin")
    files = {nfd: b"decomposed on disk" * 100, "plain.bin": b"plain"}
    write_tree(tmp_path / "pipeline" / "run", files)
    with bootstrap(settings) as app:
        v = app.service.register_directory(DATASET, tmp_path / "pipeline" / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", dst.name)
        run_until_idle(settings, [placement.id], processes=0, options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", (st.error, st.last_errors)
        view = tmp_path / "lustre" / DATASET / v.version_id
        nfc = unicodedata.normalize("NFC", nfd)
        assert (view / nfc).read_bytes() == files[nfd]
