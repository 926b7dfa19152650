"""Digests: equal to the real xxh128sum, identical for any block boundaries and thread count."""

from __future__ import annotations

import array
import itertools
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from datasync.manifest.hashing import (
    MIN_BUFFER_SIZE,
    ChunkedHasher,
    digest_bytes,
    hash_fd,
    hash_file,
    hash_stream,
)

MiB = 1024 * 1024
EMPTY = "xxh3-128:99aa06d3014798d86001c324468d497f"


def xxh128sum(data: bytes) -> str:
    """The real binary's digest of ``data`` (read from stdin)."""
    exe = shutil.which("xxh128sum")
    if exe is None:
        pytest.skip("xxh128sum (Debian package xxhash) is not installed")
    out = subprocess.run([exe, "-"], input=data, capture_output=True, check=True).stdout
    return "xxh3-128:" + out.split()[0].decode()


def expected(data: bytes, chunk_size: int) -> tuple[str, tuple[str, ...]]:
    """The definition, spelled with one-shot xxhash calls on slices."""
    whole = "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    if len(data) <= chunk_size:
        return whole, ()
    return whole, tuple(
        "xxh3-128:" + xxhash.xxh3_128_hexdigest(data[i : i + chunk_size])
        for i in range(0, len(data), chunk_size)
    )


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(9 * MiB + 12345)


def test_empty_digest() -> None:
    assert digest_bytes(b"") == EMPTY
    assert hash_stream([], MiB) == (EMPTY, ())


@pytest.mark.parametrize("size", [0, 1, 240, MiB - 1, 2 * MiB, 9 * MiB + 12345])
def test_file_digests_equal_the_real_xxh128sum(tmp_path: Path, blob: bytes, size: int) -> None:
    data = blob[:size]
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    exe = shutil.which("xxh128sum")
    if exe is None:
        pytest.skip("xxh128sum (Debian package xxhash) is not installed")
    out = subprocess.run([exe, str(path)], capture_output=True, check=True, text=True).stdout
    digest, chunks = hash_file(path, 4 * MiB)
    assert digest == "xxh3-128:" + out.split()[0]
    # Every chunk digest is what xxh128sum prints for that chunk's bytes.
    want = [xxh128sum(data[i : i + 4 * MiB]) for i in range(0, size, 4 * MiB)]
    assert list(chunks) == (want if size > 4 * MiB else [])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [MiB, 3 * MiB + 7, 9 * MiB + 12345, 64 * MiB])
def test_threads_and_chunk_boundaries_do_not_change_results(
    tmp_path: Path, blob: bytes, threads: int, chunk_size: int
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(blob)
    seen: list[int] = []
    got = hash_file(path, chunk_size, MIN_BUFFER_SIZE, threads=threads, on_bytes=seen.append)
    assert got == expected(blob, chunk_size)
    assert sum(seen) == len(blob)


def test_pipelined_mode_really_uses_a_reader_thread(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(blob)
    names: set[str] = set()

    def spy(_: int) -> None:
        names.update(t.name for t in threading.enumerate())

    hash_file(path, MiB, MIN_BUFFER_SIZE, threads=2, on_bytes=spy)
    assert "datasync-hash-reader" in names
    names.clear()
    hash_file(path, MiB, MIN_BUFFER_SIZE, threads=1, on_bytes=spy)
    assert "datasync-hash-reader" not in names


def test_reader_errors_reach_the_caller(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            hash_fd(fd, MiB, threads=2, size_hint=1 << 40)
        with pytest.raises(IsADirectoryError):
            hash_fd(fd, MiB, threads=1)
    finally:
        os.close(fd)
    assert "datasync-hash-reader" not in {t.name for t in threading.enumerate()}


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        hash_file(fifo, MiB)


def test_small_buffers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="at least"):
        hash_file(tmp_path / "f", MiB, buffer_size=64 * 1024)


@pytest.mark.parametrize(
    ("size", "n"), [(MiB - 1, 0), (MiB, 0), (MiB + 1, 2), (2 * MiB, 2), (2 * MiB + 1, 3)]
)
def test_chunk_counts_at_the_boundaries(size: int, n: int) -> None:
    digest, chunks = hash_stream([bytes(size)], MiB)
    assert len(chunks) == n
    assert (digest, chunks) == expected(bytes(size), MiB)


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=5000),
    st.integers(1, 700),
    st.lists(st.integers(0, 5000), max_size=8),
)
def test_any_block_boundaries_give_the_same_digests(
    data: bytes, chunk_size: int, cuts: list[int]
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    blocks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert hash_stream(blocks, chunk_size) == expected(data, chunk_size)
    # memoryview and bytearray blocks too (cloud SDKs hand out either).
    views = [memoryview(bytearray(b)) for b in blocks]
    assert hash_stream(views, chunk_size) == expected(data, chunk_size)


def test_typed_buffers_are_hashed_as_bytes() -> None:
    words = array.array("I", range(1000))
    assert hash_stream([memoryview(words)], 1000) == expected(words.tobytes(), 1000)


def test_result_can_be_taken_midway() -> None:
    h = ChunkedHasher(4)
    h.update(b"abcdef")
    assert h.result() == h.result()
    assert h.result().chunks == expected(b"abcdef", 4)[1]
    h.update(b"gh")
    assert (h.result().digest, h.result().chunks) == expected(b"abcdefgh", 4)
    assert h.size == 8
    with pytest.raises(ValueError):
        ChunkedHasher(0)
