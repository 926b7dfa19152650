"""Storage that fills up, sources that change, destinations damaged after publish (issue 13,
item 3).

* **ENOSPC**: the destination site is a small tmpfs, mostly filled by a ballast file that is
  removed as soon as the first ``NoSpace`` is seen. NoSpace is either a permanent failure
  (the placement FAILED, classified) or a pause that retries (the placement READY); both
  are accepted. A FAILED placement is replicated again once there is room.
* **A source file changed or deleted after registration**: the transfer reads, hashes,
  refuses the bytes and marks the source bad; with no other source the placement fails at
  once (one attempt, a permanent error naming the file), and a good copy named with
  ``--from`` completes it.
* **A destination file corrupted after publish** (root writes into a read-only view, or a
  view object is overwritten): ``verify`` finds it, the placement is DAMAGED (not READY,
  so no job is handed the damage), and the repair publishes the right bytes again.

Every view is hashed independently (``xxh128sum``, or the SDK and ``xxhash``).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from datasync.bootstrap import App, bootstrap
from datasync.events import Event, TaskFailed, TaskRetried
from datasync.transfer.layout import blob_key
from tests.faults.harness import (
    FAST,
    EventLog,
    Figures,
    assert_blob_store_sound,
    assert_no_task_lost,
    assert_outcome,
    assert_published_right,
    record,
    run_workers,
    timed,
    view_digests,
    xxh,
)
from tests.fixtures.replication import (
    MIB,
    cloud_site,
    make_tree,
    posix_site,
    seed_cloud_source,
    settings_for,
    upload_tree,
    write_tree,
)
from tests.fixtures.transfer import version_pk

DATASET = "drive/storage"


def _db(db_url: str) -> str:
    return "postgresql" if db_url.startswith("postgresql") else "sqlite"


# -- ENOSPC -------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs (needs root, as on the CI machines); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_destination_is_a_clear_failure_or_a_pause(
    tmp_path: Path, db_url: str, tmpfs: Path
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    small = posix_site("small", tmpfs / "site")
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run", shards=(3 * MIB, 2 * MIB + 9))
    ballast = tmpfs / "ballast"
    with ballast.open("wb") as out:
        out.write(os.urandom(9 * MIB))  # leaves about 3 MiB for a 5.3 MiB version
    figures = Figures(
        fault="ENOSPC (a 12 MiB tmpfs as the destination)",
        where="posix -> tmpfs",
        db=_db(db_url),
        command=f"pytest tests/faults/test_storage_faults.py -k 'full and {_db(db_url)}'",
    )
    settings = settings_for(tmp_path / "home", db_url, [pipeline, small])
    with bootstrap(settings) as app, timed(figures):
        events = EventLog(app)
        freed = threading.Event()

        def free_space(event: Event) -> None:
            nospace = isinstance(event, TaskRetried | TaskFailed) and event.error_class == "NoSpace"
            if nospace and not freed.is_set():
                freed.set()
                ballast.unlink()

        app.bus.subscribe(free_space)
        v = app.service.register_directory(DATASET, pipeline.root / "run", chunk_size=MIB)
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "small")
        assert run_workers(app, [placement.id], timeout=120)
        assert freed.is_set(), "the destination never filled up"
        state = assert_outcome(app, placement.id, figures)
        if state == "FAILED":
            assert figures.reason and "NoSpace" in figures.reason, figures.reason
        figures.extra["tasks"] = assert_no_task_lost(app, placement.id)
        figures.data_lost = assert_published_right(
            small, DATASET, v.version_id, files, state
        ) + assert_blob_store_sound(app, small)
        figures.injected = sum(
            1 for e in events.events if getattr(e, "error_class", None) == "NoSpace"
        )
        figures.task_retries = len(events.retried())
        if state == "FAILED":  # room again: replicating once more completes it
            app.replication.replicate(f"{DATASET}@{v.version_id}", "small")
            assert run_workers(app, [placement.id])
            (st,) = app.replication.status(placement_id=placement.id)
            assert st.state == "READY", (st.error, st.last_errors)
            assert_published_right(small, DATASET, v.version_id, files, "READY")
            figures.extra["after replicate again"] = "READY"
        # What the failed writes left (hidden temps) is dark data: the audit moves it away.
        audit = app.auditor.audit("small", grace=timedelta(0))
        assert not audit.lost and not audit.missing_views, audit.summary()
        figures.extra["dark moved by audit"] = len(audit.quarantined)
    record(figures)


# -- a source changed or deleted after registration ------------------------------------------


def test_a_source_changed_or_deleted_after_registration_fails_at_once(
    tmp_path: Path, db_url: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    spare = posix_site("spare", tmp_path / "spare")
    lustre = posix_site("lustre", tmp_path / "lustre")
    assert pipeline.root is not None and spare.root is not None
    files = make_tree(pipeline.root / "run", shards=(3 * MIB,))
    figures = Figures(
        fault="source file changed and another deleted after registration",
        where="posix -> posix",
        db=_db(db_url),
        command=f"pytest tests/faults/test_storage_faults.py -k 'source_changed and {_db(db_url)}'",
    )
    settings = settings_for(tmp_path / "home", db_url, [pipeline, spare, lustre])
    with bootstrap(settings) as app, timed(figures):
        events = EventLog(app)
        v = app.service.register_directory(DATASET, pipeline.root / "run", chunk_size=MIB)
        changed = pipeline.root / "run/cam0/000002.jpg"
        changed.write_bytes(bytes(b ^ 0x55 for b in changed.read_bytes()))  # same size
        (pipeline.root / "run/cam1/000003.jpg").unlink()
        figures.injected = 2
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        assert run_workers(app, [placement.id])
        state = assert_outcome(app, placement.id, figures)
        assert state == "FAILED", "a changed source must not be published"
        assert figures.reason and "(permanent error): ChecksumMismatch" in figures.reason
        assert "cam0/000002.jpg" in figures.reason or "cam1/000003.jpg" in figures.reason
        assert events.failures() and not events.retried(), "a permanent error stops at once"
        assert_no_task_lost(app, placement.id)
        figures.data_lost = assert_published_right(lustre, DATASET, v.version_id, files, state)
        # A good copy named with --from mends it (the bad source stays bad).
        write_tree(spare.root / "run", files)
        app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre", source="spare:run")
        assert run_workers(app, [placement.id])
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "READY", (st.error, st.last_errors)
        figures.data_lost += assert_published_right(lustre, DATASET, v.version_id, files, "READY")
        figures.data_lost += assert_blob_store_sound(app, lustre)
        figures.task_retries = len(events.retried())
        figures.extra["after --from a good copy"] = "READY"
    record(figures)


@pytest.mark.emulator
def test_an_object_rewritten_at_the_source_is_refused(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    """On S3 the read is pinned to the ETag seen at registration; the rewritten object's
    new bytes are read unpinned, hashed, and refused."""
    source = cloud_site("pipeline", "s3", request)
    lustre = posix_site("lustre", tmp_path / "lustre")
    files = make_tree(tmp_path / "local")
    settings = settings_for(tmp_path / "home", sqlite_url, [source, lustre])
    figures = Figures(
        fault="source object rewritten after registration",
        where="s3 -> posix",
        db="sqlite",
        command="pytest tests/faults/test_storage_faults.py -k object_rewritten",
    )
    with bootstrap(settings) as app, timed(figures):
        v = app.service.register_directory(DATASET, tmp_path / "local")
        backend = source.backend()
        upload_tree(backend, "run/", files)
        pk = version_pk(app.engine, app.store.resolve(f"{DATASET}@{v.version_id}"))
        seed_cloud_source(app, pk, source, "run")
        upload_tree(backend, "run/", {"lidar/sweep 001.bin": os.urandom(20_001)})
        backend.close()
        figures.injected = 1
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        assert run_workers(app, [placement.id])
        state = assert_outcome(app, placement.id, figures)
        assert state == "FAILED" and figures.reason and "sweep 001.bin" in figures.reason
        assert_no_task_lost(app, placement.id)
        figures.data_lost = assert_published_right(lustre, DATASET, v.version_id, files, state)
    record(figures)


# -- a destination file corrupted after publish ---------------------------------------------


def _repair_cycle(app: App, site: str, ref: str | None) -> tuple[int, list[int]]:
    report = app.verifier.verify(site, ref, repair=True)
    assert not report.clean, "verify must find the damage"
    return len(report.damaged), report.repairs_planned


def test_a_posix_view_corrupted_after_publish_is_found_and_repaired(
    tmp_path: Path, db_url: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    assert pipeline.root is not None and lustre.root is not None
    files = make_tree(pipeline.root / "run")
    figures = Figures(
        fault="destination file corrupted after publish",
        where="posix",
        db=_db(db_url),
        command=f"pytest tests/faults/test_storage_faults.py -k 'posix_view and {_db(db_url)}'",
    )
    settings = settings_for(tmp_path / "home", db_url, [pipeline, lustre])
    with bootstrap(settings) as app, timed(figures):
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        assert run_workers(app, [placement.id], options=FAST)
        view = lustre.root / DATASET / v.version_id
        victim = view / "lidar/sweep 001.bin"  # the blob's own inode (a hard link)
        st = victim.stat()
        os.chmod(victim, 0o644)
        with victim.open("r+b") as f:  # root flips a byte and restores the mtime
            f.seek(1000)
            f.write(bytes([f.read(1)[0] ^ 0xFF]))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(victim, 0o444)
        figures.injected = 1
        damaged, planned = _repair_cycle(app, "lustre", None)
        assert planned == [placement.id]
        assert run_workers(app, [placement.id])
        state = assert_outcome(app, placement.id, figures)
        assert state == "READY"
        figures.data_lost = assert_published_right(
            lustre, DATASET, v.version_id, files, state
        ) + assert_blob_store_sound(app, lustre)
        blob = lustre.root / blob_key("xxh3-128:" + xxh(files["lidar/sweep 001.bin"]))
        assert xxh(blob.read_bytes()) == xxh(files["lidar/sweep 001.bin"])
        figures.extra = {"found by": "verify (re-hash)", "damaged placements": damaged}
    record(figures)


@pytest.mark.emulator
def test_an_object_store_view_overwritten_after_publish_is_found_and_repaired(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    cloud = cloud_site("cloud", "s3", request)
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run")
    figures = Figures(
        fault="destination object overwritten after publish",
        where="s3",
        db="sqlite",
        command="pytest tests/faults/test_storage_faults.py -k object_store_view_overwritten",
    )
    settings = settings_for(tmp_path / "home", sqlite_url, [pipeline, cloud])
    with bootstrap(settings) as app, timed(figures):
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        ref = f"{DATASET}@{v.version_id}"
        placement = app.replication.replicate(ref, "cloud")
        assert run_workers(app, [placement.id])
        backend = cloud.backend()
        size = len(files["cam1/000009.jpg"])
        upload_tree(backend, f"{DATASET}/{v.version_id}/", {"cam1/000009.jpg": b"x" * size})
        backend.close()
        figures.injected = 1
        _damaged, planned = _repair_cycle(app, "cloud", ref)
        assert planned == [placement.id]
        # Until the repair is published, readers see no view at all (the marker went first).
        assert view_digests(cloud, DATASET, v.version_id) is None
        assert run_workers(app, [placement.id])
        state = assert_outcome(app, placement.id, figures)
        assert state == "READY"
        figures.data_lost = assert_published_right(
            cloud, DATASET, v.version_id, files, state
        ) + assert_blob_store_sound(app, cloud)
        figures.extra = {"found by": "verify SITE DATASET@REF (re-hash of the view)"}
    record(figures)
