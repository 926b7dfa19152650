"""Integrity reproducers (issue "Integrity first"): paths an operator takes in the first
week that once left wrong bytes in a READY view, or damage that could not be repaired.

Every check of a view's bytes is independent of datasync: POSIX views are hashed with
``xxh128sum`` (Debian's xxhash) and object-store views are downloaded through a fresh SDK
backend and hashed with the ``xxhash`` module. Each test names the invariant it pins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col
from typer.testing import CliRunner

from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.db.transfer_tables import Replica
from datasync.transfer.layout import COMPLETE_MARKER, blob_key
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    Site,
    assert_view_matches,
    cloud_site,
    make_tree,
    posix_site,
    remove_tree,
    settings_for,
    write_tree,
    xxh,
    xxh128sum_tree,
)

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)


def assert_posix_view(root: Path, dataset: str, version_id: str, files: dict[str, bytes]) -> None:
    got = xxh128sum_tree(root / dataset / version_id)
    assert got == {p: xxh(d) for p, d in files.items()}


@pytest.fixture
def lab(tmp_path: Path, db_url: str) -> Iterator[tuple[App, Site, Site]]:
    """``pipeline`` and ``lustre`` POSIX sites in a fresh home, as in the reproducers."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre]))
    try:
        yield app, pipeline, lustre
    finally:
        app.close()


def replicate(app: App, ref: str, site: str, *, source: str | None = None) -> str:
    """Replicate and run workers until idle; return the final state."""
    placement = app.replication.replicate(ref, site, source=source)
    run_until_idle(app.settings, [placement.id], options=FAST)
    (st,) = app.replication.status(placement_id=placement.id)
    return f"{st.state}: {st.error or ''}"


# -- 9: a missing or corrupt destination blob heals (invariant 2, 5) ------------------------


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_a_damaged_posix_blob_is_moved_again_for_the_next_version(
    lab: tuple[App, Site, Site], damage: str
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    run1 = pipeline.root / "run1"
    files = make_tree(run1)
    v1 = app.service.register_directory("drive/heal", run1)
    assert replicate(app, f"drive/heal@{v1.version_id}", "lustre").startswith("READY")
    shared = files["cam0/000003.jpg"]
    blob = lustre.root / blob_key("xxh3-128:" + xxh(shared))
    if damage == "delete":
        blob.unlink()
    else:
        os.chmod(blob, 0o644)  # what root can still do to a read-only blob
        data = bytes(b ^ 0xFF for b in shared) if damage == "corrupt" else shared[:-1]
        blob.write_bytes(data)
    # v2 shares the damaged file: the planner counts it present, publish finds it.
    run2 = pipeline.root / "run2"
    files2 = {**files, "extra/new.bin": b"new bytes in v2"}
    write_tree(run2, files2)
    v2 = app.service.register_directory("drive/heal", run2)
    assert replicate(app, f"drive/heal@{v2.version_id}", "lustre").startswith("READY")
    assert_posix_view(lustre.root, "drive/heal", v2.version_id, files2)


def test_a_new_versions_view_trusts_nothing_in_the_previous_view(
    tmp_path: Path, db_url: str
) -> None:
    """v2 at a site that shows v1 equals v2 built at a fresh site (both hashed by
    ``xxh128sum``): a file someone replaced in v1's view (a new inode) and one written in
    place (the blob's own inode, so the blob is damaged) reach neither."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    lustre = posix_site("lustre", tmp_path / "lustre")
    fresh = posix_site("fresh", tmp_path / "fresh")
    assert pipeline.root is not None and lustre.root is not None and fresh.root is not None
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre, fresh]))
    try:
        files = make_tree(pipeline.root / "run1")
        v1 = app.service.register_directory("drive/inc", pipeline.root / "run1")
        assert replicate(app, f"drive/inc@{v1.version_id}", "lustre").startswith("READY")
        old = lustre.root / "drive/inc" / v1.version_id
        os.chmod(old / "cam0", 0o755)  # root (or the owner) lifts the view's protection
        (old / "cam0/000002.jpg").unlink()
        (old / "cam0/000002.jpg").write_bytes(b"a user's own file")
        os.chmod(old / "cam0/000004.jpg", 0o644)
        (old / "cam0/000004.jpg").write_bytes(b"x" * len(files["cam0/000004.jpg"]))
        files2 = {**files, "cam1/000005.jpg": b"changed in v2"}
        write_tree(pipeline.root / "run2", files2)
        v2 = app.service.register_directory("drive/inc", pipeline.root / "run2")
        for site in ("lustre", "fresh"):
            assert replicate(app, f"drive/inc@{v2.version_id}", site).startswith("READY")
    finally:
        app.close()
    want = {p: xxh(d) for p, d in files2.items()}
    assert xxh128sum_tree(lustre.root / "drive/inc" / v2.version_id) == want
    assert xxh128sum_tree(fresh.root / "drive/inc" / v2.version_id) == want


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_an_object_store_that_lost_its_blobs_heals(
    tmp_path: Path, db_url: str, request: pytest.FixtureRequest, kind: str
) -> None:
    """A store that lost acknowledged writes (an emulator restarted without its data):
    every blob of the site vanished. The next version re-sends them, it does not fail."""
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    cloud = cloud_site("cloud", kind, request)
    assert pipeline.root is not None
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, cloud]))
    try:
        run1 = pipeline.root / "run1"
        files = make_tree(run1)
        v1 = app.service.register_directory("drive/lost", run1)
        assert replicate(app, f"drive/lost@{v1.version_id}", "cloud").startswith("READY")
        backend = cloud.backend()
        for obj in list(backend.list(".datasync/blobs/")):
            backend.delete(obj.key)
        backend.close()
        run2 = pipeline.root / "run2"
        files2 = {**files, "extra/v2.bin": b"second"}
        write_tree(run2, files2)
        v2 = app.service.register_directory("drive/lost", run2)
        assert replicate(app, f"drive/lost@{v2.version_id}", "cloud").startswith("READY")
        assert_view_matches(cloud, "drive/lost", v2.version_id, files2)
    finally:
        app.close()


# -- 1: rows named by --from are hashed, never trusted (invariant 2) -------------------------


def test_from_rows_are_hashed_and_a_changed_file_never_reaches_a_view(
    lab: tuple[App, Site, Site], tmp_path: Path
) -> None:
    app, _pipeline, lustre = lab
    assert lustre.root is not None
    incoming = lustre.root / "incoming" / "run7"
    files = {"a.jpg": b"a" * 3000, "b.bin": b"b" * 5000}
    write_tree(incoming, files)
    manifest = tmp_path / "run7.jsonl"
    manifest.write_text(
        json.dumps({"format": "datasync-producer/1", "chunk_size": 1 << 20})
        + "\n"
        + "".join(
            json.dumps({"path": p, "size": len(d), "digest": "xxh3-128:" + xxh(d)}) + "\n"
            for p, d in files.items()
        )
    )
    v1 = app.service.register_manifest("drive/p", manifest, label="v1")
    (incoming / "b.bin").write_bytes(b"X" * 5000)  # same size, other bytes
    state = replicate(app, "drive/p@v1", "lustre", source="lustre:incoming/run7")
    assert (state.startswith("FAILED") and "b.bin" not in state) or "no good source" in state
    assert not (lustre.root / "drive/p" / v1.version_id).exists(), "no view with wrong bytes"
    assert app.service.show("drive/p@v1").verified is False
    # The producer fixes the file: --from names it again, and it is hashed again.
    (incoming / "b.bin").write_bytes(files["b.bin"])
    assert replicate(app, "drive/p@v1", "lustre", source="lustre:incoming/run7") == "READY: "
    assert_posix_view(lustre.root, "drive/p", v1.version_id, files)
    assert app.service.show("drive/p@v1").verified is True


# -- 2: a source under the destination's root is copied, never linked (invariant 2) ---------


def test_a_source_inside_the_destination_site_is_copied_into_the_blob_store(
    lab: tuple[App, Site, Site],
) -> None:
    app, _pipeline, lustre = lab
    assert lustre.root is not None
    run1 = lustre.root / "out" / "run1"
    files = {"a.jpg": b"frame" * 400, "b/c.bin": b"lidar" * 900}
    write_tree(run1, files)
    v = app.service.register("drive/s", "lustre:out/run1")
    assert replicate(app, f"drive/s@{v.version_id}", "lustre") == "READY: "
    view = lustre.root / "drive/s" / v.version_id
    assert os.stat(view / "a.jpg").st_ino != os.stat(run1 / "a.jpg").st_ino
    (run1 / "a.jpg").write_bytes(b"X\n")  # the user keeps working in their directory
    assert_posix_view(lustre.root, "drive/s", v.version_id, files)


# -- 3, 4: labels never replace a user's file; names and labels never collide ---------------


def test_a_label_never_replaces_a_users_file_and_the_view_stays_ready(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    (lustre.root / "proj").mkdir()
    (lustre.root / "proj" / "README").write_text("the team's notes")
    (lustre.root / "proj@README").write_text("a file someone named like a label")
    files = make_tree(pipeline.root / "p1")
    v = app.service.register("proj", str(pipeline.root / "p1"), label="README")
    assert replicate(app, f"proj@{v.version_id}", "lustre") == "READY: "
    assert (lustre.root / "proj" / "README").read_text() == "the team's notes"
    assert (lustre.root / "proj@README").read_text() == "a file someone named like a label"
    assert os.readlink(lustre.root / "proj@latest") == f"proj/{v.version_id}"
    assert_posix_view(lustre.root, "proj", v.version_id, files)
    (st,) = app.replication.status(dataset="proj")
    assert st.state == "READY"
    assert any("not made by datasync" in e["message"] for e in st.last_errors)


def test_a_dataset_named_like_another_datasets_label_gets_its_own_place(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    a = make_tree(pipeline.root / "a", seed=1)
    b = make_tree(pipeline.root / "b", seed=2)
    va = app.service.register("a", str(pipeline.root / "a"))
    vb = app.service.register("a/latest", str(pipeline.root / "b"))
    for ref in (f"a/latest@{vb.version_id}", f"a@{va.version_id}"):  # both orders collide
        assert replicate(app, ref, "lustre") == "READY: "
    assert_posix_view(lustre.root, "a", va.version_id, a)
    assert_posix_view(lustre.root, "a/latest", vb.version_id, b)
    assert os.readlink(lustre.root / "a@latest") == f"a/{va.version_id}"
    assert os.readlink(lustre.root / "a/latest@latest") == f"latest/{vb.version_id}"


# -- 5: views are read-only; a corrupt blob is not linked into a new view --------------------


def test_a_normal_user_cannot_change_a_view(tmp_path: Path, db_url: str) -> None:
    if shutil.which("runuser") is None:
        pytest.skip("runuser not installed")
    open_root = Path(tempfile.mkdtemp(prefix="datasync-ro-"))  # traversable by others
    try:
        os.chmod(open_root, 0o755)
        pipeline = posix_site("pipeline", open_root / "pipeline")
        lustre = posix_site("lustre", open_root / "lustre")
        app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, lustre]))
        try:
            files = make_tree(open_root / "pipeline" / "run")
            v = app.service.register("drive/ro", str(open_root / "pipeline" / "run"))
            assert replicate(app, f"drive/ro@{v.version_id}", "lustre") == "READY: "
        finally:
            app.close()
        view = open_root / "lustre" / "drive/ro" / v.version_id
        target = view / "cam0" / "000001.jpg"
        as_nobody = ["runuser", "-u", "nobody", "--", "sh", "-c"]
        readable = subprocess.run([*as_nobody, f"cat '{target}' > /dev/null"], check=False)
        assert readable.returncode == 0, "the test user can reach the view"
        for attempt in (f"echo X >> '{target}'", f"rm -f '{target}'", f"touch '{view}/new'"):
            assert subprocess.run([*as_nobody, attempt], check=False).returncode != 0, attempt
        assert_posix_view(open_root / "lustre", "drive/ro", v.version_id, files)
    finally:
        for d in (open_root / "lustre").rglob("*"):
            if d.is_dir() and not d.is_symlink():
                os.chmod(d, 0o755)
        shutil.rmtree(open_root, ignore_errors=True)


# -- 7: labels follow to every site where the version is published --------------------------


def test_labels_follow_to_the_site_and_never_point_at_the_wrong_version(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    make_tree(pipeline.root / "r1", seed=1)
    make_tree(pipeline.root / "r2", seed=2)
    v1 = app.service.register("drive/c", str(pipeline.root / "r1"), label="v1")
    assert replicate(app, "drive/c@v1", "lustre") == "READY: "
    app.service.set_label("drive/c@v1", "prod")
    run_until_idle(app.settings, options=FAST)  # the labels task
    assert os.readlink(lustre.root / "drive/c@prod") == f"c/{v1.version_id}"
    v2 = app.service.register("drive/c", str(pipeline.root / "r2"), label="v2")
    app.service.set_label("drive/c@v2", "prod")  # v2 is not at lustre yet
    run_until_idle(app.settings, options=FAST)
    assert not os.path.lexists(lustre.root / "drive/c@prod"), "prod must not mean v1 any more"
    assert not os.path.lexists(lustre.root / "drive/c@latest")
    assert os.readlink(lustre.root / "drive/c@v1") == f"c/{v1.version_id}"
    assert replicate(app, "drive/c@v2", "lustre") == "READY: "
    for label in ("prod", "latest", "v2"):
        assert os.readlink(lustre.root / f"drive/c@{label}") == f"c/{v2.version_id}"


# -- 8: a source found bad is not bad forever ------------------------------------------------


def test_a_restored_source_works_again_after_registration_or_after_its_recheck(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    run = pipeline.root / "run"
    files = make_tree(run)
    v = app.service.register("drive/b", str(run))
    good = (run / "cam0/000004.jpg").read_bytes()
    (run / "cam0/000004.jpg").write_bytes(good[:10])  # truncated behind our back
    assert replicate(app, f"drive/b@{v.version_id}", "lustre").startswith("FAILED")
    (run / "cam0/000004.jpg").write_bytes(good)
    again = app.service.register("drive/b", str(run))  # hashed again: the same version
    assert again.version_id == v.version_id and not again.created
    assert replicate(app, f"drive/b@{v.version_id}", "lustre") == "READY: "
    assert_posix_view(lustre.root, "drive/b", v.version_id, files)


def test_a_bad_source_is_tried_again_once_its_recheck_time_has_come(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    run = pipeline.root / "run"
    files = make_tree(run)
    v = app.service.register("drive/r", str(run))
    good = (run / "lidar/sweep 001.bin").read_bytes()
    (run / "lidar/sweep 001.bin").write_bytes(b"\0" * len(good))
    assert replicate(app, f"drive/r@{v.version_id}", "lustre").startswith("FAILED")
    (run / "lidar/sweep 001.bin").write_bytes(good)
    with app.engine.begin() as conn:  # the back-off has passed
        conn.execute(
            sa.update(Replica)
            .where(col(Replica.state) == "bad")
            .values(recheck_after=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert replicate(app, f"drive/r@{v.version_id}", "lustre") == "READY: "
    assert_posix_view(lustre.root, "drive/r", v.version_id, files)


# -- 10, 5: verify finds damage, and --repair mends it ---------------------------------------


def _verify(app: App, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli_app, ["verify", *args, "--json"], env=_env(app), catch_exceptions=False
    )
    assert result.exit_code in (0, 1), result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["clean"] is (result.exit_code == 0)
    return doc


def _env(app: App) -> dict[str, str]:
    config = app.settings.home / "datasync.toml"
    if not config.exists():
        lines = [f'database_url = "{app.settings.database_url}"', "chunk_size = 1048576"]
        for name, site in app.settings.sites.items():
            lines.append(f"[sites.{name}]\nurl = {json.dumps(site.url)}")
            if site.options:
                opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in site.options.items())
                lines.append(f"options = {{ {opts} }}")
        config.write_text("\n".join(lines) + "\n")
    return {"DATASYNC_HOME": str(app.settings.home), "DATASYNC_CONFIG": str(config)}


def test_verify_finds_a_damaged_posix_view_and_repair_mends_it(
    lab: tuple[App, Site, Site],
) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    files = make_tree(pipeline.root / "run")
    v = app.service.register("drive/v", str(pipeline.root / "run"))
    assert replicate(app, f"drive/v@{v.version_id}", "lustre") == "READY: "
    assert _verify(app, "lustre")["clean"]
    view = lustre.root / "drive/v" / v.version_id
    os.chmod(view / "cam1", 0o755)
    (view / "cam1/000007.jpg").unlink()  # root deletes a file from the view
    blob = lustre.root / blob_key("xxh3-128:" + xxh(files["cam0/000002.jpg"]))
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:  # ... and flips a byte in a blob, keeping its mtime
        times = os.fstat(f.fileno())
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    os.utime(blob, ns=(times.st_atime_ns, times.st_mtime_ns))
    report = _verify(app, "lustre")
    assert len(report["bad_blobs"]) == 1 and report["damaged"][0]["problems"] >= 1
    assert any("cam1/000007.jpg is missing" in p for p in report["damaged"][0]["first"])
    (st,) = app.replication.status(dataset="drive/v")
    assert st.state == "DAMAGED" and "verify" in (st.error or "")
    report = _verify(app, "lustre", "--repair")
    assert report["repairs_planned"] == [st.id]
    run_until_idle(app.settings, options=FAST)
    (st,) = app.replication.status(dataset="drive/v")
    assert st.state == "READY", st.error
    assert_posix_view(lustre.root, "drive/v", v.version_id, files)
    assert _verify(app, "lustre")["clean"]


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_verify_finds_a_damaged_object_view_and_repair_mends_it(
    tmp_path: Path, db_url: str, request: pytest.FixtureRequest, kind: str
) -> None:
    pipeline = posix_site("pipeline", tmp_path / "pipeline")
    cloud = cloud_site("cloud", kind, request)
    assert pipeline.root is not None
    app = bootstrap(settings_for(tmp_path / "home", db_url, [pipeline, cloud]))
    try:
        files = make_tree(pipeline.root / "run")
        v = app.service.register("drive/o", str(pipeline.root / "run"))
        assert replicate(app, f"drive/o@{v.version_id}", "cloud") == "READY: "
        backend = cloud.backend()
        prefix = f"drive/o/{v.version_id}"
        backend.delete(f"{prefix}/{COMPLETE_MARKER}")  # by our own rule: not published
        report = _verify(app, "cloud")
        assert "not published" in report["damaged"][0]["first"][0]
        _verify(app, "cloud", "--repair")
        run_until_idle(app.settings, options=FAST)
        assert_view_matches(cloud, "drive/o", v.version_id, files)
        # A view object overwritten with other bytes of the same size: a deep verify.
        key = f"{prefix}/cam0/000005.jpg"
        w = backend.begin(key, len(files["cam0/000005.jpg"]), 1 << 30)
        w.put_part(0, b"Z" * len(files["cam0/000005.jpg"]))
        w.commit()
        backend.close()
        assert _verify(app, "cloud")["clean"], "a shallow check sees the size only"
        report = _verify(app, "cloud", f"drive/o@{v.version_id}", "--repair")
        assert "000005.jpg does not hash" in report["damaged"][0]["first"][0]
        run_until_idle(app.settings, options=FAST)
        assert_view_matches(cloud, "drive/o", v.version_id, files)
        assert app.replication.status(dataset="drive/o")[0].state == "READY"
    finally:
        app.close()


def test_replicate_rebuilds_a_view_deleted_by_hand(lab: tuple[App, Site, Site]) -> None:
    app, pipeline, lustre = lab
    assert pipeline.root is not None and lustre.root is not None
    files = make_tree(pipeline.root / "run")
    v = app.service.register("drive/gone", str(pipeline.root / "run"))
    assert replicate(app, f"drive/gone@{v.version_id}", "lustre") == "READY: "
    remove_tree(lustre.root / "drive/gone" / v.version_id)
    assert replicate(app, f"drive/gone@{v.version_id}", "lustre") == "READY: "
    assert_posix_view(lustre.root, "drive/gone", v.version_id, files)
