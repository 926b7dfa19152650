"""Direct I/O on the POSIX backend: large parts written with ``O_DIRECT`` from page-aligned
pool buffers, and read back the same way (``PosixBackend.digest``), so the read-back sees
what the device holds: a misdirected or damaged write is caught (invariant 2).

A file system that refuses ``O_DIRECT`` (tmpfs) skips the tests that need it; the option
tests and the fallbacks run everywhere."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from datasync.backends.posix import PosixBackend
from datasync.backends.posix.io import DIRECT_ALIGN, open_direct, pwrite_direct
from datasync.errors import ConfigError
from datasync.transfer.buffers import BufferPool
from datasync.transfer.readback import hash_object

KIB = 1024
PART = 256 * KIB
MIN = 64 * KIB  # writeback_min_bytes of the backends below: every full part is "large"
WRITER_PWRITE = "datasync.backends.posix.writer.pwrite_direct"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    probe = path / "probe"
    probe.write_bytes(b"")
    fd = open_direct(str(probe), os.O_RDONLY)
    probe.unlink()
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(fd)
    return path


def _backend(root: Path, **kw: object) -> PosixBackend:
    return PosixBackend(root, lustre=False, writeback_min_bytes=MIN, **kw)  # type: ignore[arg-type]


def _content(size: int) -> bytes:
    return bytes((i * 7 + i // 4096) % 251 for i in range(size))


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[: len(data)] = data
    return buf


def _digest(data: bytes) -> str:
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


def _pooled(b: bytes) -> memoryview:
    return memoryview(_aligned(b))[: len(b)]


def _write(
    backend: PosixBackend, key: str, data: bytes, view: Callable[[bytes], memoryview]
) -> None:
    w = backend.begin(key, len(data), PART)
    for j in range(-(-len(data) // PART)):
        w.put_part(j, view(data[j * PART : (j + 1) * PART]))
    w.commit()


def _spy_direct(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each ``put_part`` wrote with direct I/O."""
    wrote: list[int] = []
    real = pwrite_direct

    def spy(fd: int, view: memoryview, offset: int) -> int:
        n = real(fd, view, offset)
        wrote.append(n)
        return n

    monkeypatch.setattr(WRITER_PWRITE, spy)
    return wrote


@pytest.fixture
def spied(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[PosixBackend, list[int]]:
    """A backend that writes large parts direct, and the bytes each part wrote so."""
    return _backend(root, direct_io=True), _spy_direct(monkeypatch)


def test_direct_io_option_auto_picks_local_file_systems(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    mountinfo = tmp_path / "mountinfo"
    for fs, want in (("ext4", True), ("xfs", True), ("lustre", True), ("nfs4", False),
                     ("tmpfs", False), ("btrfs", False)):  # fmt: skip
        mountinfo.write_text(f"36 35 98:0 / {root} rw - {fs} /dev/x rw\n")
        backend = PosixBackend(root, lustre=False, mountinfo=str(mountinfo))
        assert backend.files.direct_io is want, fs
    assert PosixBackend(root, lustre=False, direct_io=False).files.direct_io is False
    assert PosixBackend(root, lustre=False, direct_io="true").files.direct_io is True
    with pytest.raises(ConfigError, match="direct_io"):
        PosixBackend(root, lustre=False, direct_io="sometimes")


def test_large_parts_are_written_direct_and_read_back_direct(
    root: Path, spied: tuple[PosixBackend, list[int]]
) -> None:
    backend, wrote = spied
    data = _content(3 * PART + 1000)  # the last part is small and unaligned: buffered
    _write(backend, "big.bin", data, _pooled)
    assert (root / "big.bin").read_bytes() == data
    assert sorted(wrote) == [PART, PART, PART], "every full part went to the device directly"
    pool = BufferPool(4 * PART)
    expected = _digest(data)
    assert hash_object(backend, "big.bin", len(data), buffers=pool, block=PART) == expected
    with pool.lease(PART) as buf, memoryview(buf) as mem:
        assert backend.digest("big.bin", mem) == expected


def test_unaligned_buffers_and_offsets_fall_back_to_buffered_writes(
    root: Path, spied: tuple[PosixBackend, list[int]]
) -> None:
    backend, wrote = spied
    data = _content(2 * PART)  # two full parts from odd addresses

    def unaligned(b: bytes) -> memoryview:
        raw = bytearray(len(b) + 1)
        raw[1:] = b
        return memoryview(raw)[1:]  # an odd address: O_DIRECT refuses it

    _write(backend, "odd.bin", data, unaligned)
    assert (root / "odd.bin").read_bytes() == data
    assert wrote and not any(wrote), "the refused direct writes fell back to buffered ones"
    # A part size that is not a multiple of the alignment: later parts start unaligned.
    w = backend.begin("skew.bin", 3 * (PART + 1), PART + 1)
    skewed = _content(3 * (PART + 1))
    for j in range(3):
        w.put_part(j, memoryview(_aligned(skewed[j * (PART + 1) : (j + 1) * (PART + 1)])))
    w.commit()
    assert (root / "skew.bin").read_bytes() == skewed


def test_a_site_without_direct_io_writes_and_reads_through_the_page_cache(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(root, direct_io=False)
    wrote = _spy_direct(monkeypatch)
    data = _content(2 * PART)
    _write(backend, "cached.bin", data, _pooled)
    assert wrote == [], "no direct write was even tried"
    assert not backend.reads_direct(len(data))
    expected = _digest(data)
    assert hash_object(backend, "cached.bin", len(data), buffers=BufferPool(4 * PART)) == expected


def test_a_misdirected_direct_write_is_caught_by_the_read_back(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct write that lands one block off (a driver or file-system bug) leaves the
    right length and the wrong bytes: the read-back from the device must see it."""
    backend = _backend(root, direct_io=True)
    real = pwrite_direct

    def misdirected(fd: int, view: memoryview, offset: int) -> int:
        return real(fd, view, offset + DIRECT_ALIGN) if offset else real(fd, view, offset)

    monkeypatch.setattr(WRITER_PWRITE, misdirected)
    data = _content(2 * PART)
    _write(backend, "off.bin", data, _pooled)
    expected = _digest(data)
    pool = BufferPool(4 * PART)
    assert hash_object(backend, "off.bin", len(data), buffers=pool) != expected


def test_bytes_changed_after_the_commit_are_caught_by_the_direct_read_back(root: Path) -> None:
    backend = _backend(root, direct_io=True)
    data = _content(2 * PART)
    _write(backend, "flip.bin", data, _pooled)
    path = root / "flip.bin"
    os.chmod(path, 0o644)
    with path.open("r+b") as fh:  # a buffered write: still dirty in the page cache
        fh.seek(PART + 5)
        fh.write(b"\x00" if data[PART + 5] else b"\x01")
    expected = _digest(data)
    pool = BufferPool(4 * PART)
    assert backend.reads_direct(len(data))
    assert hash_object(backend, "flip.bin", len(data), buffers=pool) != expected
    # A truncated file hashes short, so it cannot match either.
    os.truncate(path, PART + DIRECT_ALIGN + 7)
    assert hash_object(backend, "flip.bin", len(data), buffers=pool) != expected


def test_a_resumed_upload_writes_direct_and_close_releases_both_descriptors(
    root: Path, spied: tuple[PosixBackend, list[int]]
) -> None:
    # A chunk task writes its parts and closes its writer; finalize resumes by token.
    backend, wrote = spied
    data = _content(2 * PART)
    first = backend.begin("resumed.bin", len(data), PART)
    first.put_part(0, _pooled(data[:PART]))
    first.close()
    held = [
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    ]
    assert not [t for t in held if t.startswith(str(root))], "no descriptor outlives close()"
    second = backend.begin("resumed.bin", len(data), PART, token=first.token)
    second.put_part(1, _pooled(data[PART:]))
    second.commit()
    assert wrote == [PART, PART]
    assert (root / "resumed.bin").read_bytes() == data
