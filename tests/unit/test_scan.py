"""Scanning a local tree: canonical order, parallel hashing, and every rejection policy."""

from __future__ import annotations

import itertools
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import datasync.manifest.scan as scan_module
from datasync.errors import InvalidPath, SourceChanged, UnsupportedFileType
from datasync.manifest.canonical import VersionIdBuilder, path_sort_key
from datasync.manifest.hashing import HashResult, hash_fd, hash_file
from datasync.manifest.scan import scan_directory, scan_total
from datasync.models import FileEntry, ManifestHeader

MiB = 1024 * 1024


def make_tree(root: Path) -> dict[str, bytes]:
    """A small driving-dataset-like tree; returns path -> content."""
    files = {
        "cam0/000000.jpg": b"jpeg 0" * 100,
        "cam0/000001.jpg": b"jpeg 1" * 100,
        "lidar/sweep 0001.bin": os.urandom(3 * MiB + 17),  # spans chunks
        "lidar/sweep 0002.bin": os.urandom(2 * MiB),  # exactly two chunks
        "a.txt": b"dot sorts before slash",
        "a/x": b"inside a",
        "a0": b"zero sorts after slash",
        "empty.flag": b"",
        "Zürich café/ü ü.txt": "grüezi".encode(),
        "deep/1/2/3/4/5/leaf": b"leaf",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty-dir").mkdir()
    return files


def scan(root: Path, **kw: Any) -> list[FileEntry]:
    kw.setdefault("chunk_size", MiB)
    kw.setdefault("workers", 2)
    return list(scan_directory(root, **kw))


def test_scan_yields_every_file_in_bytewise_order_with_digests(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    entries = scan(tmp_path)
    paths = [e.path for e in entries]
    assert paths == sorted(files, key=path_sort_key)
    assert paths[:3] == ["Zürich café/ü ü.txt", "a.txt", "a/x"]
    for e in entries:
        p = tmp_path / e.path
        assert e.size == len(files[e.path])
        assert (e.digest, e.chunks) == hash_file(p, MiB)
    assert len(next(e for e in entries if e.path == "lidar/sweep 0001.bin").chunks) == 4
    assert len(next(e for e in entries if e.path == "lidar/sweep 0002.bin").chunks) == 2
    # The stream is already canonical: the builder accepts it as is.
    b = VersionIdBuilder(ManifestHeader(chunk_size=MiB))
    b.add_all(entries)
    assert (b.files, b.bytes) == (len(files), sum(map(len, files.values())))


def test_worker_count_and_hash_threads_do_not_change_the_result(tmp_path: Path) -> None:
    make_tree(tmp_path)
    one = scan(tmp_path, workers=1, hash_threads=1)
    assert scan(tmp_path, workers=4) == one
    assert scan(tmp_path, workers=2, hash_threads=2, buffer_size=MiB) == one


def test_directory_order_uses_nfc_names_and_slash_suffix(tmp_path: Path) -> None:
    (tmp_path / "e\u0301").mkdir()  # decomposed on disk
    (tmp_path / "e\u0301" / "f").write_bytes(b"1")
    (tmp_path / "\u00e9a").write_bytes(b"2")  # composed
    (tmp_path / "e").write_bytes(b"3")
    paths = [e.path for e in scan(tmp_path)]
    assert paths == ["e", "\u00e9/f", "\u00e9a"]


def test_progress_reports_reach_the_totals(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    reports: list[tuple[int, int]] = []
    scan(tmp_path, on_progress=lambda f, b: reports.append((f, b)))
    total = (len(files), sum(map(len, files.values())))
    assert reports[-1] == total
    for (f0, b0), (f1, b1) in itertools.pairwise(reports):  # monotonic in both
        assert f0 <= f1 and b0 <= b1
    assert scan_total(tmp_path) == total


def test_scan_streams_instead_of_listing_the_whole_tree_first(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i:03}").write_bytes(b"x")
    (tmp_path / "z").mkdir()
    it = scan_directory(tmp_path, chunk_size=MiB, workers=1)
    first = next(it)
    assert first.path == "a/000"
    # "z" has not been listed yet, so a file created there now still shows up.
    (tmp_path / "z" / "late").write_bytes(b"late")
    rest = [e.path for e in it]
    assert rest[-1] == "z/late" and len(rest) == 40


def test_closing_early_stops_the_pool(tmp_path: Path) -> None:
    make_tree(tmp_path)
    it = scan_directory(tmp_path, chunk_size=MiB, workers=3)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("datasync-hash")]


def test_a_file_growing_while_hashed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "log").write_bytes(b"x" * 1000)

    def append_then_hash(fd: int, *args: Any, **kwargs: Any) -> HashResult:
        with (tmp_path / "log").open("ab") as f:  # a writer sneaks in after the fstat
            f.write(b"more")
        return hash_fd(fd, *args, **kwargs)

    monkeypatch.setattr(scan_module, "hash_fd", append_then_hash)
    with pytest.raises(SourceChanged, match="'log' changed while it was being hashed"):
        scan(tmp_path)


# --- policies ---------------------------------------------------------------------------


def test_symlink_to_a_file_inside_is_recorded_with_the_targets_bytes(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.bin").write_bytes(b"payload")
    (tmp_path / "link.bin").symlink_to("real/data.bin")
    (tmp_path / "real" / "abs.bin").symlink_to(tmp_path / "real" / "data.bin")
    entries = {e.path: e for e in scan(tmp_path)}
    assert set(entries) == {"link.bin", "real/abs.bin", "real/data.bin"}
    assert entries["link.bin"].digest == entries["real/data.bin"].digest
    assert entries["real/abs.bin"].size == 7


def link_to_fifo(root: Path) -> None:
    os.mkfifo(root / "d" / "f2")
    (root / "l").symlink_to("d/f2")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root, out: (root / "l").symlink_to(out / "secret"), "points outside the root"),
        (lambda root, out: (root / "l").symlink_to("../outside/secret"), "points outside"),
        (lambda root, out: (root / "l").symlink_to("/etc"), "points outside the root"),
        (lambda root, out: (root / "l").symlink_to("missing"), "dangling"),
        (lambda root, out: (root / "l").symlink_to("l"), "loop"),
        (lambda root, out: (root / "l").symlink_to("d"), "points to a directory"),
        (lambda root, out: (root / "l").symlink_to("."), "points to a directory"),
        (lambda root, out: os.mkfifo(root / "d" / "fifo"), "FIFO"),
        (
            lambda root, out: link_to_fifo(root),
            "FIFO",
        ),
    ],
)
def test_rejected_links_and_special_files(
    tmp_path: Path, make: Callable[[Path, Path], object], match: str
) -> None:
    root = tmp_path / "root"
    out = tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    out.mkdir()
    (out / "secret").write_bytes(b"s")
    (root / "ok").write_bytes(b"ok")
    make(root, out)
    with pytest.raises(UnsupportedFileType, match=match):
        scan(root)


def test_sockets_are_rejected_naming_the_path(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.sock"))
        with pytest.raises(UnsupportedFileType, match=r"'s.sock' is a socket"):
            scan(tmp_path)
    finally:
        sock.close()


def test_devices_are_rejected(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(UnsupportedFileType, match="character device"):
        scan(tmp_path)


def test_nfc_twins_in_one_directory_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "caf\u00e9.txt").write_bytes(b"1")
    (tmp_path / "d" / "cafe\u0301.txt").write_bytes(b"2")
    with pytest.raises(InvalidPath, match=r"in directory 'd'.*same name after Unicode NFC"):
        scan(tmp_path)


def test_twins_between_a_file_and_a_directory_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "caf\u00e9").write_bytes(b"1")
    (tmp_path / "cafe\u0301").mkdir()
    with pytest.raises(InvalidPath, match="NFC"):
        scan(tmp_path)


@pytest.mark.parametrize(
    ("name", "match"), [(b"bad\xff.jpg", "not valid UTF-8"), (b"a\nb", r"U\+000A")]
)
def test_bad_names_are_rejected(tmp_path: Path, name: bytes, match: str) -> None:
    (tmp_path / "sub").mkdir()
    fd = os.open(os.path.join(os.fsencode(tmp_path / "sub"), name), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    with pytest.raises(InvalidPath, match=match) as info:
        scan(tmp_path)
    assert "in directory 'sub'" in str(info.value)


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(InvalidPath, match="is not a directory"):
        scan_directory(tmp_path / "f", chunk_size=MiB, workers=1)
    with pytest.raises(InvalidPath, match="is not a directory"):
        scan_directory(tmp_path / "missing", chunk_size=MiB, workers=1)


def test_exclude_skips_names_directly_under_the_root_only(tmp_path: Path) -> None:
    """A site root's ``.datasync`` is not visited at all; deeper ones are content."""
    (tmp_path / "f").write_bytes(b"f")
    (tmp_path / ".datasync" / "blobs").mkdir(parents=True)
    (tmp_path / ".datasync" / "blobs" / "x").write_bytes(b"x")
    os.mkfifo(tmp_path / ".datasync" / "fifo")  # would be refused if it were visited
    (tmp_path / "sub" / ".datasync").mkdir(parents=True)
    (tmp_path / "sub" / ".datasync" / "y").write_bytes(b"yy")
    got = [e.path for e in scan(tmp_path, exclude=(".datasync",))]
    assert got == ["f", "sub/.datasync/y"]
    assert scan_total(tmp_path, (".datasync",)) == (2, 3)
    with pytest.raises(UnsupportedFileType, match="FIFO"):
        scan(tmp_path)


def test_a_backslash_in_a_name_is_refused_naming_the_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a\\b.jpg").write_bytes(b"1")
    with pytest.raises(InvalidPath, match=r"in directory 'd'.*backslash") as info:
        scan(tmp_path)
    assert "a\\\\b.jpg" in str(info.value)  # repr of the name


def test_root_given_through_a_symlink_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    (tmp_path / "alias").symlink_to("real")
    assert [e.path for e in scan(tmp_path / "alias")] == ["f"]
