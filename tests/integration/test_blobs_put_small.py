"""A batch of small POSIX blobs through ``put_small`` (``datasync/transfer/exec/blobs.py``).

Invariant 2 (docs/design.md): each blob is hashed from the source bytes before the write
and re-read at its key after the commit; only a match is recorded. A blob whose bytes
go wrong after the write, or whose source changes during the batch, fails alone: the
rest of its batch is recorded in the same attempt, and nothing partial is left visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from datasync.backends.base import SmallPut
from datasync.backends.posix import PosixBackend, PosixFiles
from datasync.backends.posix import writer as posix_writer
from datasync.bootstrap import App, bootstrap
from datasync.config import Settings
from datasync.transfer.layout import blob_key
from datasync.transfer.siteindex import SiteIndex
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import (
    MIB,
    Site,
    assert_view_matches,
    make_tree,
    posix_site,
    settings_for,
    xxh,
)
from tests.fixtures.transfer import tasks_of

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.02, lease_seconds=30)


def _digest(data: bytes) -> str:
    return f"xxh3-128:{xxh(data)}"


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site, dict[str, bytes]]:
    src = posix_site("pipeline", tmp_path / "src")
    dst = posix_site("lustre", tmp_path / "dst")
    assert src.root is not None
    return src, dst, make_tree(src.root / "run")


def _replicate(
    app: App, settings: Settings, src: Site, dataset: str
) -> tuple[int, str, str | None, str | None]:
    """Register ``src``'s tree, replicate it to ``lustre`` with in-process workers;
    return ``(placement id, version id, state, error)``."""
    assert src.root is not None
    v = app.service.register_directory(dataset, src.root / "run", chunk_size=MIB)
    placement = app.replication.replicate(f"{dataset}@{v.version_id}", "lustre")
    run_until_idle(settings, [placement.id], options=FAST)
    st = app.replication.status(placement_id=placement.id)[0]
    return placement.id, v.version_id, st.state, st.error


@pytest.fixture
def put_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The keys of every ``PosixBackend.put_small`` call, in call order."""
    calls: list[list[str]] = []
    real = PosixBackend.put_small

    def spy(
        self: PosixBackend, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> list[SmallPut | Exception]:
        calls.append([key for key, _ in items])
        return real(self, items)

    monkeypatch.setattr(PosixBackend, "put_small", spy)
    return calls


def test_a_blob_corrupted_after_its_write_fails_alone_and_is_copied_again(
    tmp_path: Path,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    put_calls: list[list[str]],
    sites: tuple[Site, Site, dict[str, bytes]],
) -> None:
    src, dst, files = sites
    assert dst.root is not None
    bad_key = blob_key(_digest(files["cam0/000005.jpg"]))
    real = posix_writer._read_back
    corrupted: list[str] = []

    def corrupt_once(files_: PosixFiles, key: str, path: str) -> SmallPut:
        if key == bad_key and not corrupted:  # after the rename, before the read-back
            corrupted.append(key)
            Path(path).chmod(0o644)
            with open(path, "r+b") as f:
                f.write(b"\0\0\0\0")
        return real(files_, key, path)

    monkeypatch.setattr(posix_writer, "_read_back", corrupt_once)
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst], MIB)
    app = bootstrap(settings)
    try:
        placement, version, state, error = _replicate(app, settings, src, "drive/c")
        assert state == "READY", error
        assert corrupted == [bad_key]
        blobs = [t for t in tasks_of(app.engine, placement) if t.kind == "blobs"]
        assert [t.attempts for t in blobs] == [2]
        unique = {blob_key(_digest(data)) for data in files.values()}
        assert sorted(put_calls[0]) == sorted(unique), "one call for the whole batch"
        assert put_calls[1:] == [[bad_key]], "the others were recorded by the first attempt"
        assert_view_matches(dst, "drive/c", version, files)
        assert list(PosixBackend(dst.root, lustre=False).partial_uploads()) == []
    finally:
        app.close()


def test_a_source_changed_during_the_batch_fails_only_its_blob(
    tmp_path: Path,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    put_calls: list[list[str]],
    sites: tuple[Site, Site, dict[str, bytes]],
) -> None:
    src, dst, files = sites
    assert dst.root is not None
    changed = "cam1/000007.jpg"
    real = PosixBackend.read_range_into

    def change_on_first_read(
        self: PosixBackend, key: str, offset: int, buf: bytearray | memoryview, **kw: object
    ) -> int:
        path = Path(self.files.root) / key
        if key.endswith(changed) and path.read_bytes() == files[changed]:
            path.write_bytes(bytes(b ^ 0xFF for b in files[changed]))  # same size
        return real(self, key, offset, buf, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(PosixBackend, "read_range_into", change_on_first_read)
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst], MIB)
    app = bootstrap(settings)
    try:
        assert _replicate(app, settings, src, "drive/s")[2] != "READY"
        digests = {_digest(data) for data in files.values()}
        gone = _digest(files[changed])
        assert SiteIndex(app.engine).present("lustre", sorted(digests)) == digests - {gone}
        assert blob_key(gone) not in {k for call in put_calls for k in call}, "never written"
        stored = {o.key for o in PosixBackend(dst.root, lustre=False).list(".datasync/blobs/")}
        assert stored == {blob_key(d) for d in digests - {gone}}
        assert list(PosixBackend(dst.root, lustre=False).partial_uploads()) == []
    finally:
        app.close()
