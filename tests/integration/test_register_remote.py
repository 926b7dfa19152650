"""One registration policy for every source (issue 7), through the service that the CLI
and API call:

* ``register`` from s3://, az://, gs:// and ``SITE:path`` gives the same version id as the
  same tree registered from a local directory, against the real emulators;
* ``SITE:path`` on a POSIX site is scanned exactly like the directory given by path: the
  same verdict on symlinks, loops, FIFOs and files changed while hashed, the same id;
* a site root's ``.datasync/`` is never content, on POSIX and object-store sites.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import xxhash

import datasync.manifest.scan as scan_module
from datasync.bootstrap import App, bootstrap
from datasync.errors import DatasyncError, UserError
from datasync.manifest.hashing import HashResult, hash_fd
from datasync.service import RegisterResult
from datasync.transfer.sites import site_for_source
from tests.fixtures.replication import (
    cloud_site,
    make_tree,
    posix_site,
    settings_for,
    upload_tree,
    write_tree,
)
from tests.integration.manifest_helpers import counts


@pytest.mark.emulator
@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_cloud_url_and_site_path_match_local_directory(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files = make_tree(tmp_path / "tree", shards=(2 * 1024 * 1024 + 17,))
    site = cloud_site("pipeline", kind, request)
    upload_tree(site.backend(), "drops/day1/", files)
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [site])
    with bootstrap(settings) as app:
        local = app.service.register_directory("drive/tokyo", tmp_path / "tree")
        by_url = app.service.register("drive/tokyo", f"{site.config.url}/drops/day1")
        by_site = app.service.register("drive/tokyo", "pipeline:drops/day1/")
        assert by_url.version_id == local.version_id == by_site.version_id
        assert not by_url.created and not by_site.created
        assert by_url.files == len(files)
        with pytest.raises(UserError, match="no site named"):
            app.service.register("drive/tokyo", "nosuchsite:drops/day1")


@pytest.mark.emulator
def test_schemes_without_a_backend_are_read_through_fsspec(tmp_path: Path) -> None:
    """A zip archive (fsspec's ``zip://``) registers to the same id as the unpacked tree."""
    files = make_tree(tmp_path / "tree")
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [])
    with bootstrap(settings) as app:
        local = app.service.register_directory("drive/zipped", tmp_path / "tree")
        zipped = app.service.register("drive/zipped", f"zip://::file://{archive}")
        assert zipped.version_id == local.version_id and not zipped.created


# -- SITE:path on a POSIX site is the directory scanner ----------------------------------


@pytest.fixture
def lustre(tmp_path: Path) -> Iterator[tuple[App, Path]]:
    """An app with a POSIX site ``lustre``; yields it and the site's root."""
    site = posix_site("lustre", tmp_path / "site")
    assert site.root is not None
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [site])
    with bootstrap(settings) as app:
        yield app, site.root


def _outcome(register: Callable[[], RegisterResult]) -> tuple[str, str]:
    """("ok", version id) or (error class, message) of one registration."""
    try:
        result = register()
    except DatasyncError as exc:
        return type(exc).__name__, exc.message
    return "ok", result.version_id


def _link_inside(run: Path) -> None:
    (run / "link.bin").symlink_to("cam0/000001.jpg")


def _link_escaping(run: Path) -> None:
    (run.parent / "secret").write_bytes(b"s")
    (run / "evil").symlink_to("../secret")


def _dangling(run: Path) -> None:
    (run / "gone").symlink_to("missing")


def _loop(run: Path) -> None:
    (run / "l1").symlink_to("l2")
    (run / "l2").symlink_to("l1")


def _fifo(run: Path) -> None:
    os.mkfifo(run / "pipe")


# name -> (make the case in the tree, expected error class and message part; None = ok)
SCANNER_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, str] | None]] = {
    "symlink-to-file-inside": (_link_inside, None),
    "symlink-escaping": (_link_escaping, ("UnsupportedFileType", "points outside the root")),
    "dangling-link": (_dangling, ("UnsupportedFileType", "is dangling")),
    "link-loop": (_loop, ("UnsupportedFileType", "is a loop")),
    "fifo": (_fifo, ("UnsupportedFileType", "FIFO")),
}


@pytest.mark.parametrize("name", list(SCANNER_CASES))
def test_site_path_on_a_posix_site_gets_the_directory_verdict(
    lustre: tuple[App, Path], name: str
) -> None:
    app, root = lustre
    run = root / "out" / "run1"
    files = make_tree(run)
    make, expected = SCANNER_CASES[name]
    make(run)
    url = app.settings.database_url
    by_dir = _outcome(lambda: app.service.register("drive/x", str(run)))
    after_dir = counts(url)
    by_site = _outcome(lambda: app.service.register("drive/x", "lustre:out/run1"))
    assert by_site == by_dir
    if expected is None:
        assert by_dir[0] == "ok"
        listed = {f.path: f.digest for f in app.service.iter_files("drive/x")}
        assert set(listed) == {*files, "link.bin"}
        target = xxhash.xxh3_128_hexdigest(files["cam0/000001.jpg"])
        assert listed["link.bin"] == f"xxh3-128:{target}"
        assert counts(url) == after_dir  # the second registration found the same version
    else:
        assert by_dir[0] == expected[0] and expected[1] in by_dir[1], by_dir
        assert counts(url) == after_dir == dict.fromkeys(after_dir, 0)


def test_a_file_changed_while_hashed_is_refused_both_ways(
    lustre: tuple[App, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, root = lustre
    run = root / "out" / "run1"
    write_tree(run, {"a.bin": b"a" * 1000, "log": b"x" * 1000})

    def append_then_hash(fd: int, *args: Any, **kwargs: Any) -> HashResult:
        with (run / "log").open("ab") as f:  # a writer sneaks in after the fstat
            f.write(b"more")
        return hash_fd(fd, *args, **kwargs)

    monkeypatch.setattr(scan_module, "hash_fd", append_then_hash)
    for source in (str(run), "lustre:out/run1"):
        kind, message = _outcome(lambda: app.service.register("drive/x", source))  # noqa: B023
        assert kind == "SourceChanged" and "changed while it was being hashed" in message
    assert counts(app.settings.database_url) == {
        "datasets": 0,
        "versions": 0,
        "entries": 0,
        "labels": 0,
    }


def test_site_path_records_the_directory_so_the_site_is_found(lustre: tuple[App, Path]) -> None:
    app, root = lustre
    make_tree(root / "out" / "run1")
    reg = app.service.register("drive/x", "lustre:out/run1/")
    engine = sa.create_engine(app.settings.database_url)
    try:
        with engine.connect() as conn:
            source = conn.execute(sa.text("SELECT source FROM versions")).scalar_one()
    finally:
        engine.dispose()
    assert source == f"directory:{(root / 'out' / 'run1').resolve()}"
    assert site_for_source(app.settings, source) == ("lustre", "out/run1/")
    assert app.service.register("drive/x", str(root / "out" / "run1")).version_id == (
        reg.version_id
    )


def test_site_path_may_not_leave_the_site_through_a_symlink(
    lustre: tuple[App, Path], tmp_path: Path
) -> None:
    app, root = lustre
    make_tree(tmp_path / "elsewhere")
    (root / "out").mkdir()
    (root / "out" / "away").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the site root"):
        app.service.register("drive/x", "lustre:out/away")
    assert app.service.register("drive/x", str(tmp_path / "elsewhere")).created


def _blob_store(root: Path) -> None:
    """What a site root holds besides datasets: datasync's blob store and temporary parts."""
    write_tree(root, {".datasync/blobs/ab/cd/abcd": b"blob", ".datasync/tmp/.x.part": b"p"})


def test_a_posix_site_roots_datasync_dir_is_not_content(
    lustre: tuple[App, Path], tmp_path: Path
) -> None:
    app, root = lustre
    files = make_tree(root)
    _blob_store(root)
    write_tree(tmp_path / "copy", files)
    expected = app.service.register("drive/copy", str(tmp_path / "copy")).version_id
    by_dir = app.service.register("drive/root", str(root))
    by_site = app.service.register("drive/root", "lustre:")
    assert by_dir.version_id == by_site.version_id == expected
    assert by_dir.files == len(files)
    # Below the root, a directory named .datasync is ordinary content.
    write_tree(root / "out", {"x": b"x", ".datasync/y": b"y"})
    out = app.service.register("drive/out", "lustre:out")
    assert {f.path for f in app.service.iter_files(out.ref)} == {"x", ".datasync/y"}


@pytest.mark.emulator
def test_an_object_store_site_roots_datasync_prefix_is_not_content(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files = make_tree(tmp_path / "tree")
    site = cloud_site("pipeline", "s3", request)
    backend = site.backend()
    try:
        upload_tree(backend, "", {**files, ".datasync/blobs/ab/cd/abcd": b"blob"})
    finally:
        backend.close()
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [site])
    with bootstrap(settings) as app:
        local = app.service.register_directory("drive/tokyo", tmp_path / "tree")
        by_site = app.service.register("drive/tokyo", "pipeline:")
        by_url = app.service.register("drive/tokyo", site.config.url)
        assert by_site.version_id == by_url.version_id == local.version_id
        assert by_site.files == len(files)
