"""Registration through fsspec (read-only): same entries as a local scan, writes refused."""

from __future__ import annotations

import random
from pathlib import Path

import fsspec
import pytest

from datasync.backends.cloudscan import scan_backend
from datasync.backends.fsspecsrc import FsspecSource
from datasync.errors import NotFound, Unsupported
from datasync.manifest.scan import scan_directory

MiB = 1024 * 1024
TREE = {"a/one.bin": 2 * MiB + 7, "a b/two": 10, "c/🚀": 0, "z": 3}


def _tree(root: Path) -> None:
    rng = random.Random(5)
    for name, size in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(rng.randbytes(size))


def test_memory_filesystem_scans_like_a_directory(tmp_path: Path) -> None:
    _tree(tmp_path / "local")
    mem = fsspec.filesystem("memory")
    root = f"/ds-{tmp_path.name}"
    for name in TREE:
        mem.pipe(f"{root}/tree/{name}", (tmp_path / "local" / name).read_bytes())
    source = FsspecSource(f"memory://{root}")
    try:
        got = list(scan_backend(source, "tree", chunk_size=MiB, workers=3, read_size=300_000))
        assert got == list(scan_directory(tmp_path / "local", chunk_size=MiB, workers=1))
        assert source.stat("tree/z").size == 3
        assert source.read_range("tree/z", 1, 10) == (tmp_path / "local" / "z").read_bytes()[1:]
        with pytest.raises(NotFound):
            source.stat("tree/missing")
        with pytest.raises(Unsupported):
            source.begin("x", 1, 1)
        with pytest.raises(Unsupported):
            source.delete("tree/z")
    finally:
        mem.rm(root, recursive=True)


def test_missing_root_is_not_found() -> None:
    with pytest.raises(NotFound):
        list(FsspecSource("memory:///never-created-root").list(""))


def test_file_urls_work_too(tmp_path: Path) -> None:
    _tree(tmp_path)
    got = list(scan_backend(FsspecSource(f"file://{tmp_path}"), chunk_size=MiB, workers=2))
    assert [e.path for e in got] == sorted(TREE, key=lambda p: p.encode())
    assert got == list(scan_directory(tmp_path, chunk_size=MiB, workers=1))
