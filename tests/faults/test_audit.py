"""``datasync audit``: lost replicas and dark files (issue 13, item 4).

The audit lists a site's storage and compares it with the index read before and after the
listing. These tests damage real sites (POSIX, S3 on moto, GCS on its emulator) from the
outside, as a disk, an operator or a crashed writer would, and check what the audit finds,
what it changes (lost: marked bad and re-planned; dark: moved to the quarantine, never
deleted; views without a placement: reported only), that workers then mend the views
(hashed independently), and that it never takes a running transfer's work for damage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col
from typer.testing import CliRunner

from datasync.backends.base import Backend, ObjectInfo
from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.cli.daemons import _audit_every_site, start_maintenance
from datasync.db.transfer_tables import Replica
from datasync.integrity.audit import ABORT_MIN, QUARANTINE_PREFIX, Auditor, last_audit
from datasync.transfer.exec.context import SiteBackends
from datasync.transfer.layout import BLOB_PREFIX, COMPLETE_MARKER, blob_key
from datasync.transfer.state import ReplicaRow
from tests.faults.harness import (
    Figures,
    assert_blob_store_sound,
    record,
    run_workers,
    sdk_objects,
    timed,
    view_digests,
    xxh,
)
from tests.fixtures.passthrough import PassThrough
from tests.fixtures.replication import Site, cloud_site, make_tree, posix_site, settings_for

DATASET = "drive/audit"
OLD = time.time() - 7 * 86400  # a week ago: past any grace period


@pytest.fixture
def posix_lab(tmp_path: Path, db_url: str) -> Iterator[tuple[App, Site, dict[str, bytes], str]]:
    """A version replicated to the POSIX site ``lustre``: (app, site, files, version id)."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run")
    with bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre])) as app:
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "lustre")
        assert run_workers(app, [placement.id])
        yield app, lustre, files, v.version_id


def _blob(root: Path, data: bytes) -> Path:
    return root / blob_key("xxh3-128:" + xxh(data))


def _aged(path: Path) -> Path:
    os.utime(path, (OLD, OLD), follow_symlinks=False)
    return path


def _cli_audit(app: App, *args: str) -> tuple[int, dict[str, Any]]:
    config = app.settings.home / "datasync.toml"
    lines = [f'database_url = "{app.settings.database_url}"']
    for name, site in app.settings.sites.items():
        lines.append(f"[sites.{name}]\nurl = {json.dumps(site.url)}")
    config.write_text("\n".join(lines) + "\n")
    env = {"DATASYNC_HOME": str(app.settings.home), "DATASYNC_CONFIG": str(config)}
    result = CliRunner().invoke(cli_app, ["audit", *args, "--json"], env=env)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_posix_audit_finds_lost_and_dark_and_moves_dark_to_quarantine(
    posix_lab: tuple[App, Site, dict[str, bytes], str],
) -> None:
    app, lustre, files, version_id = posix_lab
    root = lustre.root
    assert root is not None
    figures = Figures(
        fault="lost and dark files (audit)",
        where="posix",
        db=app.engine.dialect.name,
        command="pytest tests/faults/test_audit.py -k posix_audit_finds",
    )
    with timed(figures):
        # Lost: a blob deleted, another truncated (root can do both).
        gone = _blob(root, files["cam0/000001.jpg"])
        gone.unlink()
        cut = _blob(root, files["lidar/sweep 002.bin"])
        os.chmod(cut, 0o644)
        cut.write_bytes(files["lidar/sweep 002.bin"][:100])
        # Dark: an unindexed blob, a crashed writer's temp, a publisher's staging tree and
        # a stray file under .datasync/, all old; one unindexed blob written just now.
        stray_blob = _aged(_write(root / blob_key("xxh3-128:" + xxh(b"dark")), b"dark"))
        temp = _aged(_write(stray_blob.parent / ".x.datasync-0123456789abcdef.part", b"half"))
        staging = root / DATASET / f".staging-{version_id}-dead"
        _write(staging / "cam0/000001.jpg", b"staged")
        _aged(staging)
        notes = _aged(_write(root / ".datasync/notes.txt", b"someone's notes"))
        young = _write(root / blob_key("xxh3-128:" + xxh(b"young")), b"young")
        # A view with no placement, and a user's file outside datasync's names.
        orphan = _write(root / DATASET / ("f" * 64) / "x.bin", b"orphan view")
        user = _aged(_write(root / "incoming/.y.datasync-zz.part", b"not a temp name"))
        report = app.auditor.audit("lustre", grace=timedelta(hours=1))
        figures.injected = 8
    assert sorted(x.split(" at ")[1].split(":")[0] for x in report.lost) == sorted(
        str(p.relative_to(root)) for p in (gone, cut)
    )
    assert any("holds 100 bytes" in x for x in report.lost)
    moved = {str(p.relative_to(root)) for p in (stray_blob, temp, notes)} | {
        str(staging.relative_to(root)) + "/"
    }
    assert set(report.dark) == moved, report.dark
    assert report.too_young == 1 and young.exists()
    assert report.orphan_views == [f"{DATASET}/{'f' * 64}"] and orphan.exists()
    assert user.exists()
    # Quarantined, not deleted: the same bytes under .datasync/quarantine/<time>/<key>.
    (folder,) = (root / QUARANTINE_PREFIX).iterdir()
    assert (folder / stray_blob.relative_to(root)).read_bytes() == b"dark"
    assert (folder / temp.relative_to(root)).read_bytes() == b"half"
    assert (folder / staging.relative_to(root) / "cam0/000001.jpg").read_bytes() == b"staged"
    assert not stray_blob.exists() and not temp.exists() and not staging.exists()
    # Lost replicas are bad, the view DAMAGED then re-planned; workers mend it.
    assert report.repairs_planned
    with app.engine.connect() as conn:
        bad = conn.execute(
            sa.select(col(Replica.reason)).where(
                col(Replica.site) == "lustre", col(Replica.state) == "bad"
            )
        ).scalars()
        assert sorted((r or "").split(":", 1)[0] for r in bad) == ["audit", "audit"]
    (pid,) = report.repairs_planned
    phases = app.explainer.explain(pid).phases
    assert any(p.note and "audit" in p.note for p in phases), phases
    assert run_workers(app, [pid])
    (st,) = app.replication.status(placement_id=pid)
    assert st.state == "READY", (st.error, st.last_errors)
    assert view_digests(lustre, DATASET, version_id) == {p: xxh(d) for p, d in files.items()}
    figures.outcome = "READY after repair"
    figures.data_lost = assert_blob_store_sound(app, lustre)
    figures.extra = {"lost": len(report.lost), "dark quarantined": len(report.quarantined)}
    record(figures)
    # The next audit finds only what it must leave alone; the summary reaches the CLI.
    code, doc = _cli_audit(app, "lustre", "--grace-hours", "1")
    assert code == 1 and doc["lost_count"] == 0 and doc["dark_count"] == 0
    assert doc["orphan_views"] == [f"{DATASET}/{'f' * 64}"] and doc["too_young"] == 1
    assert last_audit(app.settings.home, "lustre") == doc


def test_the_audit_refuses_to_act_on_a_listing_that_looks_wrong(
    posix_lab: tuple[App, Site, dict[str, bytes], str],
) -> None:
    """Every blob gone at once looks like an unmounted file system: nothing is marked until
    ``force``; then everything is lost and re-planned."""
    app, lustre, files, _version_id = posix_lab
    assert lustre.root is not None
    blobs = lustre.root / BLOB_PREFIX
    hidden = lustre.root.parent / "hidden-blobs"
    blobs.rename(hidden)  # what an unmounted or wrongly mounted volume looks like
    blobs.mkdir()
    distinct = len({xxh(d) for d in files.values()})
    assert distinct > ABORT_MIN
    report = app.auditor.audit("lustre")
    assert report.aborted and "presumed wrong" in report.aborted
    assert len(report.lost) == distinct and not report.repairs_planned
    with app.engine.connect() as conn:
        states = set(
            conn.execute(
                sa.select(col(Replica.state)).where(
                    col(Replica.site) == "lustre", col(Replica.kind) == "blob"
                )
            ).scalars()
        )
    assert states == {"ok"}
    assert [st.state for st in app.replication.status(site="lustre")] == ["READY"]
    forced = app.auditor.audit("lustre", force=True)
    assert forced.aborted is None and forced.repairs_planned


@pytest.mark.emulator
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_object_store_audit_lost_blob_missing_view_and_dark_objects(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str, kind: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    cloud = cloud_site("cloud", kind, request)
    assert pipeline.root is not None
    files = make_tree(pipeline.root / "run")
    settings = settings_for(tmp_path / "home", sqlite_url, [pipeline, cloud])
    figures = Figures(
        fault="lost and dark objects (audit)",
        where=kind,
        db="sqlite",
        command=f"pytest tests/faults/test_audit.py -k 'object_store and {kind}'",
    )
    with bootstrap(settings) as app, timed(figures):
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id])
        backend = cloud.backend()
        try:
            lost_key = blob_key("xxh3-128:" + xxh(files["cam1/000004.jpg"]))
            backend.delete(lost_key)
            backend.delete(f"{DATASET}/{v.version_id}/{COMPLETE_MARKER}")  # the view is gone
            dark_key = blob_key("xxh3-128:" + xxh(b"dark object"))
            _put(backend, dark_key, b"dark object")
            _put(backend, ".datasync/leftover.bin", b"left over")
            orphan = f"drive/other/{'e' * 64}/{COMPLETE_MARKER}"
            _put(backend, orphan, b"{}")
        finally:
            backend.close()
        report = app.auditor.audit("cloud", grace=timedelta(0))
        figures.injected = 5
        assert [x.split(" at ")[1].split(":")[0] for x in report.lost] == [lost_key]
        assert report.missing_views == [f"{DATASET}@{v.version_id}"]
        dark = {dark_key, ".datasync/leftover.bin"}
        assert set(report.dark) == dark
        assert report.orphan_views == [f"drive/other/{'e' * 64}"]
        assert report.repairs_planned == [placement.id]
        stored = sdk_objects(cloud, "")
        folder = next(k for k in stored if k.startswith(QUARANTINE_PREFIX)).split("/")[2]
        for key in dark:
            assert key not in stored, f"{key} was not moved"
            assert f"{QUARANTINE_PREFIX}{folder}/{key}" in stored
        assert stored[f"{QUARANTINE_PREFIX}{folder}/{dark_key}"] == b"dark object"
        assert orphan in stored
        assert run_workers(app, [placement.id])
        (st,) = app.replication.status(placement_id=placement.id)
        figures.outcome = f"{st.state} after repair"
        assert st.state == "READY", (st.error, st.last_errors)
        assert view_digests(cloud, DATASET, v.version_id) == {p: xxh(d) for p, d in files.items()}
        figures.data_lost = assert_blob_store_sound(app, cloud)
        again = app.auditor.audit("cloud", grace=timedelta(0))
        assert not again.lost and not again.missing_views and not again.dark
    figures.extra = {"lost": len(report.lost), "dark quarantined": len(report.quarantined)}
    record(figures)


@pytest.mark.emulator
def test_the_audit_does_not_race_with_a_running_transfer(
    tmp_path: Path, request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    """Two transfers finish while the audit runs. One recorded its blob after the audit
    began, at a key the listing had already passed (not listed): not lost, because its row
    is newer than the audit. One committed its object before the listing reached it and
    recorded it after the index was first read: not dark, because the second read of the
    index has it. Without the two snapshots the first would be re-sent and the second
    quarantined from under its transfer."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    cloud = cloud_site("cloud", "s3", request)
    assert pipeline.root is not None
    make_tree(pipeline.root / "run")
    settings = settings_for(tmp_path / "home", sqlite_url, [pipeline, cloud])
    with bootstrap(settings) as app:
        v = app.service.register_directory(DATASET, pipeline.root / "run")
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id])
        late, racing = b"recorded after the audit began", b"committed, recorded mid-audit"
        late_key = blob_key("xxh3-128:" + xxh(late))
        racing_key = blob_key("xxh3-128:" + xxh(racing))
        direct = cloud.backend()
        _put(direct, racing_key, racing)  # committed, not yet recorded

        def record_blob(data: bytes) -> None:
            digest = "xxh3-128:" + xxh(data)
            row = ReplicaRow(digest, len(data), blob_key(digest), None)
            app.state.replicas.record("cloud", [row])

        def on_key(key: str) -> None:
            if key == racing_key:
                record_blob(racing)  # the transfer records it now

        class Racing(Auditor):
            def _now(self) -> Any:
                t1 = super()._now()
                time.sleep(0.01)
                _put(direct, late_key, late)  # written and recorded behind the listing
                record_blob(late)
                return t1

        backends = SiteBackends(settings.sites, wrap=lambda _s, b: HiddenKey(b, late_key, on_key))
        auditor = Racing(app.engine, app.state, backends, app.verifier, app.settings.home)
        report = auditor.audit("cloud", grace=timedelta(0))
        direct.close()
        backends.close()
        assert not report.lost, report.lost
        assert not report.dark, report.dark
        assert racing_key in sdk_objects(cloud, BLOB_PREFIX)
        (st,) = app.replication.status(placement_id=placement.id)
        assert st.state == "READY"


def test_up_schedules_the_audit_and_it_audits_every_site(
    posix_lab: tuple[App, Site, dict[str, bytes], str],
) -> None:
    app, _lustre, _files, _version_id = posix_lab
    scheduler = start_maintenance(app)
    try:
        job = scheduler.get_job("audit-sites")
        assert job is not None and job.trigger.interval == timedelta(hours=24)
    finally:
        scheduler.shutdown(wait=False)
    _audit_every_site(app)
    for site in ("pipeline", "lustre"):
        doc = last_audit(app.settings.home, site)
        assert doc is not None and doc["site"] == site and doc["lost_count"] == 0


# -- helpers --------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _put(backend: Backend, key: str, data: bytes) -> None:
    writer = backend.begin(key, len(data), max(len(data), 1))
    if data:
        writer.put_part(0, data)
    writer.commit()


class HiddenKey(PassThrough):
    """A real backend whose listing misses ``hidden`` (written behind the listing) and calls
    ``on_key`` as it yields each key (a transfer finishing meanwhile)."""

    def __init__(self, inner: Backend, hidden: str, on_key: Callable[[str], None]) -> None:
        super().__init__(inner)
        self._hidden = hidden
        self._on_key = on_key

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(prefix):
            if info.key != self._hidden:
                self._on_key(info.key)
                yield info
