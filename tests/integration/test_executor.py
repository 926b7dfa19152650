"""The executor against the in-memory backend (same conformance suite as the real stores),
with injected faults: throttling feeds the host-wide AIMD limits, a lost upload restarts,
a changed source is re-read and judged by its digest, and tasks are idempotent."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlmodel import col

from datasync.backends import s3
from datasync.backends.base import Backend, Capabilities
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.bootstrap import App, bootstrap
from datasync.config import Settings, SiteConfig
from datasync.db.transfer_tables import Task
from datasync.errors import Throttled, TransientError
from datasync.transfer.exec.chunked import part_plan
from datasync.transfer.limits import limits_from_settings
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    MIB,
    Site,
    assert_view_matches,
    bytes_moved,
    cloud_site,
    make_tree,
    posix_site,
    seed_cloud_source,
    settings_for,
    upload_tree,
)
from tests.fixtures.transfer import tasks_of, version_pk

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.02, lease_seconds=30)


@pytest.fixture
def stores() -> Iterator[tuple[str, str]]:
    names = (f"src-{uuid.uuid4().hex[:8]}", f"dst-{uuid.uuid4().hex[:8]}")
    yield names
    for name in names:
        drop_store(name)


def _setup(
    tmp_path: Path, sqlite_url: str, stores: tuple[str, str], concurrency: int = 8
) -> tuple[App, Settings, Site, Site, str, dict[str, bytes]]:
    src = Site("src", SiteConfig(url=f"memory://{stores[0]}"), "memory")
    dst = Site("dst", SiteConfig(url=f"memory://{stores[1]}", concurrency=concurrency), "memory")
    settings = Settings(
        home=tmp_path / "home",
        database_url=sqlite_url,
        chunk_size=MIB,
        sites={"src": src.config, "dst": dst.config},
    )
    files = make_tree(tmp_path / "local", shards=(3 * MIB + 5,))
    app = bootstrap(settings)
    v = app.service.register_directory("drive/mem", tmp_path / "local", chunk_size=MIB)
    upload_tree(MemoryBackend(stores[0]), "run/", files)
    pk = version_pk(app.engine, app.store.resolve(f"drive/mem@{v.version_id}"))
    seed_cloud_source(app, pk, src, "run")
    return app, settings, src, dst, v.version_id, files


def _replicated(
    app: App, settings: Settings, dataset: str, tree: Path, site: str
) -> tuple[str, int]:
    """Register ``tree`` (1 MiB chunks), replicate it to ``site`` with in-process workers
    until idle, and check it is READY. Returns the version id and the placement id."""
    v = app.service.register_directory(dataset, tree, chunk_size=MIB)
    placement = app.replication.replicate(f"{dataset}@{v.version_id}", site)
    run_until_idle(settings, [placement.id], options=FAST)
    st = app.replication.status(placement_id=placement.id)[0]
    assert st.state == "READY", st.error
    return v.version_id, placement.id


def _views(site: Site, version_id: str, files: dict[str, bytes]) -> None:
    # The memory store is per process: check it through a backend of this process.
    backend = MemoryBackend(site.config.url.removeprefix("memory://"))
    prefix = f"drive/mem/{version_id}/"
    got = {o.key[len(prefix) :] for o in backend.list(prefix)}
    assert got == set(files) | {".datasync-complete"}
    for path, data in files.items():
        assert backend.read_range(prefix + path, 0, len(data) + 1) == data


def test_throttling_halves_the_site_and_the_transfer_still_completes(
    tmp_path: Path, sqlite_url: str, stores: tuple[str, str]
) -> None:
    app, settings, _src, dst, vid, files = _setup(tmp_path, sqlite_url, stores, concurrency=8)
    try:
        MemoryBackend(stores[1]).inject(
            lambda: Throttled("SlowDown", retry_after=0.0), times=3, ops={"put_part"}
        )
        placement = app.replication.replicate(f"drive/mem@{vid}", "dst")
        run_until_idle(settings, [placement.id], options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        _views(dst, vid, files)
        limits = limits_from_settings(settings.home, settings.sites)
        # Halved (a burst counts once), then probed back up by the successes that followed.
        assert limits.throttled_at("dst") is not None
        assert limits.throttled_at("src") is None, "only the throttled site backs off"
        assert 4 <= limits.current_limit("dst") <= 8
        limits.close()
    finally:
        app.close()


def test_lost_upload_is_restarted_and_tasks_are_idempotent(
    tmp_path: Path, sqlite_url: str, stores: tuple[str, str]
) -> None:
    app, settings, _src, dst, vid, files = _setup(tmp_path, sqlite_url, stores)
    try:
        # The first commit of the chunked shard fails as if the upload had been reaped.
        MemoryBackend(stores[1]).inject(
            lambda: TransientError("connection reset"), times=1, ops={"commit"}
        )
        placement = app.replication.replicate(f"drive/mem@{vid}", "dst")
        run_until_idle(settings, [placement.id], options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        _views(dst, vid, files)
        first = bytes_moved(app.engine, placement.id)
        # Replicating the same version again moves nothing (invariant 5).
        again = app.replication.replicate(f"drive/mem@{vid}", "dst")
        assert again.id == placement.id and again.state == "READY"
        assert bytes_moved(app.engine, placement.id) == first
    finally:
        app.close()


def test_source_changed_but_same_bytes_is_accepted(
    tmp_path: Path, sqlite_url: str, stores: tuple[str, str]
) -> None:
    app, settings, _src, dst, vid, files = _setup(tmp_path, sqlite_url, stores)
    try:
        # Re-upload identical bytes: every ETag moves, the content does not.
        upload_tree(MemoryBackend(stores[0]), "run/", files)
        placement = app.replication.replicate(f"drive/mem@{vid}", "dst")
        run_until_idle(settings, [placement.id], options=FAST)
        assert app.replication.status(placement_id=placement.id)[0].state == "READY"
        _views(dst, vid, files)
    finally:
        app.close()


class _Caps:
    """Only what ``part_plan`` reads of a backend: its capabilities and url."""

    def __init__(self, **kw: Any) -> None:
        self.capabilities = Capabilities(**kw)
        self.url = "test://"


def test_part_plan_respects_store_limits() -> None:
    s3 = _Caps(min_part_size=5 * MIB, max_part_size=5 * 1024 * MIB, max_parts=10_000)
    plan = part_plan(cast(Backend, s3), 11 * MIB + 3, MIB)
    assert (plan.k, plan.layout.part_size, plan.parts) == (5, 5 * MIB, 3)
    assert list(plan.chunks_of(2)) == [10, 11]
    assert plan.parts_starting_in(0, 4) == [0] and plan.parts_starting_in(4, 8) == [1]
    assert plan.parts_starting_in(8, 12) == [2]
    few = _Caps(max_parts=4)
    assert part_plan(cast(Backend, few), 10 * MIB, MIB).k == 3
    assert part_plan(cast(Backend, _Caps()), 64 * MIB, 64 * MIB).parts == 1


def _fds_under(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                found.append(target)
    return found


def test_posix_chunk_tasks_and_group_commits_leave_no_open_descriptors(
    tmp_path: Path, sqlite_url: str
) -> None:
    # In-process workers: every writer a chunk task opened (and left to finalize) must be
    # closed, and every small blob of a group commit is published, re-verified and durable.
    src = posix_site("pipeline", tmp_path / "src")
    dst = posix_site("lustre", tmp_path / "dst")
    assert src.root is not None and dst.root is not None
    files = make_tree(src.root / "run", shards=(3 * MIB + 5, 2 * MIB + 1))
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst], MIB)
    app = bootstrap(settings)
    try:
        v = app.service.register_directory("drive/fd", src.root / "run", chunk_size=MIB)
        placement = app.replication.replicate(f"drive/fd@{v.version_id}", "lustre")
        kinds = {t.kind for t in tasks_of(app.engine, placement.id)}
        assert {"chunks", "finalize", "blobs"} <= kinds
        run_until_idle(settings, [placement.id], options=FAST)
        st = app.replication.status(placement_id=placement.id)[0]
        assert st.state == "READY", st.error
        assert_view_matches(dst, "drive/fd", v.version_id, files)
        assert _fds_under(dst.root) == []
        assert list(PosixBackend(dst.root, lustre=False).partial_uploads()) == []
    finally:
        app.close()


def test_posix_direct_parts_are_verified_by_the_read_back_and_a_misdirected_one_retried(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 1 MiB written with O_DIRECT (threshold lowered to 256 KiB). The first
    # direct write of the second part lands one block off: every chunk digest matched
    # before the write, so only the read-back at finalize can catch it (invariant 2); it
    # deletes the blob, restarts the upload, and the retry publishes the right bytes.
    from datasync.backends.posix.io import DIRECT_ALIGN, pwrite_direct

    src = posix_site("pipeline", tmp_path / "src")
    dst = Site(
        "lustre",
        SiteConfig(
            url=str(tmp_path / "dst"),
            options={"direct_io": True, "writeback_min_bytes": 256 * 1024},
        ),
        "posix",
        tmp_path / "dst",
    )
    assert src.root is not None and dst.root is not None
    dst.root.mkdir()
    files = make_tree(src.root / "run", shards=(3 * MIB + 5,))
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst], MIB)
    misdirected: list[int] = []

    def once_off(fd: int, view: memoryview, offset: int) -> int:
        if offset == MIB and not misdirected:
            misdirected.append(offset)
            return pwrite_direct(fd, view, offset + DIRECT_ALIGN)
        return pwrite_direct(fd, view, offset)

    monkeypatch.setattr("datasync.backends.posix.writer.pwrite_direct", once_off)
    app = bootstrap(settings)
    try:
        version_id, placement_id = _replicated(
            app, settings, "drive/direct", src.root / "run", "lustre"
        )
        assert misdirected == [MIB], "the fault was injected into a direct write"
        finalize = [t for t in tasks_of(app.engine, placement_id) if t.kind == "finalize"]
        assert [t.attempts for t in finalize] == [2], "caught at finalize, then retried"
        assert_view_matches(dst, "drive/direct", version_id, files)
    finally:
        app.close()


def test_transient_errors_are_retried_inside_the_call_by_the_one_policy(
    tmp_path: Path, sqlite_url: str, stores: tuple[str, str]
) -> None:
    """Every site's backend is wrapped by the retry policy (datasync.retry): a few resets
    are absorbed inside the failing call, so no task needs a second attempt. Bypass the
    wrapper and the tasks fail and retry instead, which this test would see."""
    app, settings, _src, dst, vid, files = _setup(tmp_path, sqlite_url, stores)
    try:
        MemoryBackend(stores[0]).inject(
            lambda: TransientError("connection reset"),
            times=2,
            ops={"read_range", "read_range_into"},
        )
        MemoryBackend(stores[1]).inject(
            lambda: TransientError("connection reset"), times=2, ops={"put_part"}
        )
        placement = app.replication.replicate(f"drive/mem@{vid}", "dst")
        run_until_idle(settings, [placement.id], options=FAST)
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "READY", st.error
        _views(dst, vid, files)
        with app.engine.connect() as conn:
            attempts = conn.execute(
                sa.select(col(Task.kind), col(Task.attempts)).where(
                    col(Task.placement_id) == placement.id
                )
            ).all()
        assert attempts and all(n == 1 for _kind, n in attempts), attempts
    finally:
        app.close()


@pytest.mark.emulator
@pytest.mark.parametrize(
    ("kind", "proofs"), [("s3", True), ("azure", True), ("gcs", True), ("s3", False)]
)
def test_finalize_proves_the_parts_chunks_tasks_sent_without_a_reread(
    tmp_path: Path,
    db_url: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    proofs: bool,
) -> None:
    # An 11 MiB shard in 1 MiB chunks goes to a cloud site as a multipart upload whose
    # parts three `chunks` tasks send; `finalize` only commits. Each task records what the
    # store showed for its part; the commit checks the whole object against those proofs
    # (MD5 of MD5s, combined CRC32C, checked block ids), so the whole-object re-read is
    # skipped. With the proofs lost, finalize re-reads as before.
    from datasync.transfer import readback
    from datasync.transfer.exec import chunked

    if not proofs:
        monkeypatch.setattr(s3._S3MultipartWriter, "part_proof", lambda _self, _i: None)
    reread: list[str] = []
    real_hash = readback.hash_object

    def counting(backend: Backend, key: str, size: int, **kwargs: Any) -> str:
        reread.append(key)
        return real_hash(backend, key, size, **kwargs)

    monkeypatch.setattr(chunked, "hash_object", counting)
    src = posix_site("pipeline", tmp_path / "src")
    assert src.root is not None
    cloud = cloud_site("cloud", kind, request)
    files = make_tree(src.root / "run", shards=(11 * MIB,))
    settings = settings_for(tmp_path / "home", db_url, [src, cloud], MIB)
    app = bootstrap(settings)
    try:
        version_id, placement_id = _replicated(
            app, settings, "drive/proved", src.root / "run", "cloud"
        )
        kinds = [t.kind for t in tasks_of(app.engine, placement_id)]
        assert kinds.count("chunks") >= 2 and kinds.count("finalize") == 1, kinds
        assert_view_matches(cloud, "drive/proved", version_id, files)  # the SDK's reads
    finally:
        app.close()
    assert len(reread) == (0 if proofs else 1), reread
