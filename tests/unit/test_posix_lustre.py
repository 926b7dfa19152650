"""Lustre striping in the POSIX backend, against a recording stand-in for ``lfs``.

There is no Lustre file system on these machines. The stand-in is a small script put first
on PATH: it appends its argv to a log, answers ``getstripe`` like lfs, and for
``setstripe`` creates the named file, as the real command does. That pins which commands we
run, with which layout, on which path, and when; it cannot prove Lustre accepts the layout.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from urllib.parse import SplitResult

import pytest

from datasync.backends.posix import PosixBackend, is_temp_name
from datasync.backends.posix.lustre import DEFAULT_LARGE_LAYOUT, detect_lustre
from datasync.errors import ConfigError

STAND_IN = """#!/bin/sh
# recording stand-in for lfs (datasync tests): one line per call, arguments tab-separated
(for arg in "$@"; do printf '%s\\t' "$arg"; done; printf '\\n') >> "$LFS_LOG"
if [ -n "$LFS_FAIL" ] && [ "$1" = "$LFS_FAIL" ]; then
    echo "lfs: error: pool not found" >&2
    exit 22
fi
case "$1" in
getstripe)
    printf 'lmm_stripe_count:  1\\nlmm_stripe_size:   1048576\\nlmm_pattern:       raid0\\n'
    ;;
setstripe)
    for last in "$@"; do :; done
    if [ -e "$last" ]; then
        echo "lfs setstripe: cannot create composite file: File exists" >&2
        exit 17
    fi
    : > "$last"
    ;;
esac
"""


@pytest.fixture
def lfs_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in ``lfs`` first on PATH; return the file its calls are logged to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "lfs"
    script.write_text(STAND_IN)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    log = tmp_path / "lfs-calls.jsonl"
    log.touch()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LFS_LOG", str(log))
    return log


def calls(log: Path) -> list[list[str]]:
    return [line.split("\t")[:-1] for line in log.read_text().splitlines()]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "lustre-root"
    path.mkdir()
    return path


def write(backend: PosixBackend, key: str, size: int, part_size: int = 4096) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    writer = backend.begin(key, size, part_size)
    for i in range(-(-size // part_size)):
        writer.put_part(i, data[i * part_size : (i + 1) * part_size])
    writer.commit()
    assert backend.read_range(key, 0, size + 1) == data


def test_small_file_gets_one_stripe_on_its_temp_before_any_write(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend(root, lustre=True)
    assert backend.capabilities.lustre_striping
    write(backend, "d/small.bin", 10_000)
    [call] = calls(lfs_log)
    assert call[:3] == ["setstripe", "-c", "1"]
    target = Path(call[3])
    assert target.parent == root / "d"
    assert is_temp_name(target.name) and target.name.startswith(".small.bin.")
    assert not target.exists()  # renamed into place
    assert (root / "d" / "small.bin").stat().st_size == 10_000


def test_large_file_gets_the_progressive_layout(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend(root, lustre=True, large_threshold_bytes=64 * 1024)
    write(backend, "big.bin", 64 * 1024)  # == threshold counts as large
    write(backend, "smaller.bin", 64 * 1024 - 1)
    big, small = calls(lfs_log)
    assert big[1:-1] == DEFAULT_LARGE_LAYOUT.split()
    assert small[1:-1] == ["-c", "1"]


def test_layouts_are_configurable_per_site(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend.from_url(
        _split(root),
        {
            "lustre": "true",
            "stripe_small_count": 2,
            "large_threshold_bytes": 8192,
            "large_layout": "-c -1 -S 4M",
        },
    )
    write(backend, "a", 100)
    write(backend, "b", 8192)
    assert [c[1:-1] for c in calls(lfs_log)] == [["-c", "2"], ["-c", "-1", "-S", "4M"]]


def test_resume_does_not_restripe(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend(root, lustre=True)
    first = backend.begin("r.bin", 8192, 4096)
    first.put_part(0, b"a" * 4096)
    second = backend.begin("r.bin", 8192, 4096, token=first.token)
    second.put_part(1, b"b" * 4096)
    second.commit()
    assert len(calls(lfs_log)) == 1
    assert backend.read_range("r.bin", 0, 8192) == b"a" * 4096 + b"b" * 4096


def test_copy_of_a_file_is_striped_too(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend(root, lustre=True)
    write(backend, "src", 5000)
    backend.copy("src", "dst")
    assert [c[0] for c in calls(lfs_log)] == ["setstripe", "setstripe"]
    assert backend.read_range("dst", 0, 9999) == backend.read_range("src", 0, 9999)


def test_failed_setstripe_falls_back_to_the_default_layout(
    lfs_log: Path, root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LFS_FAIL", "setstripe")
    backend = PosixBackend(root, lustre=True)
    with caplog.at_level(logging.WARNING, logger="datasync.backends.posix"):
        write(backend, "x.bin", 3000)
    assert len(calls(lfs_log)) == 1
    assert "pool not found" in caplog.text
    assert [p.name for p in root.iterdir()] == ["x.bin"]


def test_lustre_false_never_calls_lfs(lfs_log: Path, root: Path) -> None:
    backend = PosixBackend(root, lustre=False)
    assert not backend.capabilities.lustre_striping
    write(backend, "plain", 1000)
    assert calls(lfs_log) == []


def test_auto_detection_needs_a_lustre_mount(lfs_log: Path, root: Path, tmp_path: Path) -> None:
    # lfs is on PATH but tmp_path is not on Lustre: no striping, no lfs calls.
    backend = PosixBackend(root, lustre="auto")
    assert not backend.capabilities.lustre_striping
    write(backend, "plain", 1000)
    assert calls(lfs_log) == []
    # The same root seen through a mountinfo that says "lustre" is detected.
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        f"90 22 0:50 / {root} rw,relatime shared:1 - lustre 10.0.0.1@tcp:/fs rw,flock\n"
    )
    lustre = PosixBackend(root, lustre="auto", mountinfo=str(mountinfo))
    assert lustre.capabilities.lustre_striping
    write(lustre, "striped", 1000)
    assert [c[0] for c in calls(lfs_log)] == ["setstripe"]


def test_detect_lustre(lfs_log: Path, tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "90 22 0:50 / /lustre\\040data rw - lustre mgs@tcp:/fs rw\n"
        "91 90 0:51 / /lustre\\040data/scratch rw - nfs4 nas:/x rw\n"
    )
    lfs = str(lfs_log.parent / "bin" / "lfs")
    assert detect_lustre("/lustre data/drive", lfs, str(mountinfo))
    assert not detect_lustre("/lustre data/scratch/x", lfs, str(mountinfo))
    assert not detect_lustre("/lustre datax", lfs, str(mountinfo))
    assert not detect_lustre("/lustre data/drive", None, str(mountinfo))
    # Without mountinfo, lfs getstripe decides (the stand-in answers it).
    assert detect_lustre(str(tmp_path), lfs, str(tmp_path / "absent"))
    assert calls(lfs_log) == [["getstripe", "-d", str(tmp_path)]]


def test_lustre_true_without_lfs_is_a_config_error(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError, match="lfs"):
        PosixBackend(root, lustre=True)
    assert not PosixBackend(root, lustre="auto").capabilities.lustre_striping


def test_unknown_options_are_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match="stripe_smal"):
        PosixBackend.from_url(_split(root), {"stripe_smal": 1})
    with pytest.raises(ConfigError):
        PosixBackend.from_url(_split(root), {"lustre": "maybe"})


def _split(root: Path) -> SplitResult:
    return SplitResult("file", "", str(root), "", "")


def test_badly_typed_options_are_config_errors(root: Path) -> None:
    with pytest.raises(ConfigError, match="bad posix backend option"):
        PosixBackend.from_url(_split(root), {"lustre": False, "stripe_small_count": "four"})
