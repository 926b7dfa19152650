"""Integrity reproducers (issue "Integrity first"): paths an operator takes in the first
week that once left wrong bytes in a READY view, or damage that could not be repaired.

Every check of a view's bytes is independent of datasync: POSIX views are hashed with
``xxh128sum`` (Debian's xxhash) and object-store views are downloaded through a fresh SDK
backend and hashed with the ``xxhash`` module. Each test names the invariant it pins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from datasync.bootstrap import App, bootstrap
from datasync.transfer.layout import blob_key
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    Site,
    assert_view_matches,
    cloud_site,
    make_tree,
    posix_site,
    settings_for,
    write_tree,
    xxh,
)

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)
XXH128SUM = shutil.which("xxh128sum")


def xxh128sum_tree(root: Path) -> dict[str, str]:
    """``relative path -> hex`` of every file under ``root``, by Debian's ``xxh128sum``."""
    if XXH128SUM is None:
        pytest.skip("xxh128sum not installed (make system-deps)")
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    out = subprocess.run(
        [XXH128SUM, *paths], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in out.splitlines()}


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


def replicate(app: App, ref: str, site: str, **kw: str) -> str:
    """Replicate and run workers until idle; return the final state."""
    placement = app.replication.replicate(ref, site, **kw)
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
