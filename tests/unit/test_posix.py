"""POSIX-only behaviour the generic conformance suite cannot see: temp files on disk,
errno translation, a real ENOSPC, links across devices, and the root that is never made."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from datasync.backends.posix import (
    PosixBackend,
    PosixWriter,
    is_temp_name,
    os_error_to_storage,
    temp_name,
    translate_os_errors,
)
from datasync.backends.registry import open_backend
from datasync.errors import (
    ChecksumMismatch,
    ConfigError,
    Conflict,
    InvalidPath,
    NoSpace,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    TransientError,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def backend(root: Path) -> PosixBackend:
    return PosixBackend(root, lustre=False)


@pytest.mark.parametrize(
    ("code", "kind", "retryable"),
    [
        (errno.ENOENT, NotFound, False),
        (errno.ENOTDIR, Conflict, False),
        (errno.EISDIR, Conflict, False),
        (errno.EEXIST, Conflict, False),
        (errno.ENOTEMPTY, Conflict, False),
        (errno.EACCES, PermissionDenied, False),
        (errno.EPERM, PermissionDenied, False),
        (errno.EROFS, PermissionDenied, False),
        (errno.ENOSPC, NoSpace, True),
        (errno.EDQUOT, NoSpace, True),
        (errno.EIO, TransientError, True),
        (errno.ETIMEDOUT, TransientError, True),
        (errno.ESTALE, TransientError, True),
        (errno.ENOTCONN, TransientError, True),
        (errno.EAGAIN, TransientError, True),
        (errno.EINVAL, StorageError, False),
    ],
)
def test_errno_translation(code: int, kind: type[StorageError], retryable: bool) -> None:
    """Invariant 7: every OS error is classified, retryable or permanent, and chained."""
    exc = OSError(code, os.strerror(code), "/secret/path")
    with pytest.raises(StorageError) as caught, translate_os_errors("/root/key"):
        raise exc
    assert type(caught.value) is kind
    assert caught.value.retryable is retryable
    assert caught.value.__cause__ is exc
    assert caught.value.url == "/root/key"
    assert os.strerror(code) in str(caught.value)
    assert type(os_error_to_storage(exc, "u")) is kind


def test_a_file_in_the_way_of_a_lookup_is_not_found() -> None:
    """Reading ``a/b`` where ``a`` is a file finds nothing; writing there is a clash."""
    exc = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    assert type(os_error_to_storage(exc, "u", lookup=True)) is NotFound
    assert type(os_error_to_storage(exc, "u")) is Conflict


def test_temp_files_are_hidden_deterministic_and_unlisted(
    backend: PosixBackend, root: Path
) -> None:
    writer = backend.begin("d/file.bin", 10, 4)
    writer.put_part(1, b"4567")
    expected = root / "d" / temp_name("file.bin", writer.token)
    assert expected.name == f".file.bin.datasync-{writer.token}.part"
    assert [p.name for p in (root / "d").iterdir()] == [expected.name]
    assert expected.stat().st_size == 10  # preallocated to the final size
    assert list(backend.list("")) == []
    # the resumed writer reopens the very same file
    again = backend.begin("d/file.bin", 10, 4, token=writer.token)
    again.put_part(0, b"0123")
    again.put_part(2, b"89")
    again.commit()
    assert [p.name for p in (root / "d").iterdir()] == ["file.bin"]
    assert (root / "d" / "file.bin").read_bytes() == b"0123456789"


def test_long_names_get_a_short_temp_name(backend: PosixBackend) -> None:
    name = "n" * 250
    tmp = temp_name(name, "0" * 16)
    assert len(tmp) <= 255 and is_temp_name(tmp)
    writer = backend.begin(name, 3, 3)
    writer.put_part(0, b"abc")
    writer.commit()
    assert backend.read_range(name, 0, 3) == b"abc"


def test_keys_using_the_temp_pattern_are_refused(backend: PosixBackend) -> None:
    with pytest.raises(InvalidPath):
        backend.begin("d/.x.datasync-0123456789abcdef.part", 1, 1)


def test_resume_needs_the_same_size_and_a_real_token(backend: PosixBackend) -> None:
    writer = backend.begin("k", 10, 5)
    with pytest.raises(ValueError):
        backend.begin("k", 11, 5, token=writer.token)
    with pytest.raises(ValueError):
        backend.begin("k", 10, 5, token="../../etc/passwd")
    writer.abort()


def test_root_is_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    backend = PosixBackend(missing)
    with pytest.raises(NotFound, match="not mounted"):
        backend.begin("a/b", 1, 1)
    with pytest.raises(NotFound):
        backend.copy("a", "b")
    assert not missing.exists()


def test_a_file_cannot_hold_other_keys(backend: PosixBackend) -> None:
    writer = backend.begin("a", 1, 1)
    writer.put_part(0, b"x")
    writer.commit()
    with pytest.raises(Conflict, match="cannot hold other keys") as caught:
        backend.begin("a/b", 1, 1)
    assert not caught.value.retryable
    with pytest.raises(NotFound):
        backend.stat("a/b")
    assert [i.key for i in backend.list("a/")] == []


def test_directories_are_not_objects(backend: PosixBackend, root: Path) -> None:
    (root / "dir").mkdir()
    with pytest.raises(NotFound):
        backend.stat("dir")
    with pytest.raises(NotFound):
        backend.read_range("dir", 0, 1)
    backend.delete("dir")  # not an object: nothing to delete
    assert (root / "dir").is_dir()


def test_symlinks_are_not_listed(backend: PosixBackend, root: Path) -> None:
    (root / "real").write_bytes(b"r")
    (root / "link").symlink_to(root / "real")
    (root / "outside").symlink_to("/etc")
    assert [i.key for i in backend.list("")] == ["real"]


def test_etag_and_conditional_read(backend: PosixBackend, root: Path) -> None:
    (root / "f").write_bytes(b"hello")
    st = (root / "f").stat()
    info = backend.stat("f")
    assert info.etag == f"{st.st_mtime_ns}-{st.st_ino}-{st.st_size}"
    os.utime(root / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(SourceChanged):
        backend.read_range("f", 0, 5, etag=info.etag)
    with pytest.raises(SourceChanged):
        backend.read_range_into("f", 0, bytearray(5), etag=info.etag)


def test_copy_is_independent_and_link_shares_the_inode(backend: PosixBackend, root: Path) -> None:
    (root / "blob").write_bytes(b"content")
    backend.copy("blob", "copy")
    backend.link("blob", "v/link")
    assert (root / "copy").stat().st_ino != (root / "blob").stat().st_ino
    assert (root / "v" / "link").stat().st_ino == (root / "blob").stat().st_ino
    assert sorted(p.name for p in (root / "v").iterdir()) == ["link"]  # no temp left


def test_committed_files_are_read_only_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o000)
    try:
        for mode, backend in (
            (0o444, PosixBackend(root, lustre=False)),
            (0o640, PosixBackend(root, lustre=False, file_mode=0o640)),
        ):
            writer = backend.begin(f"m{mode:o}", 1, 1)
            writer.put_part(0, b"x")
            writer.commit()
            assert (root / f"m{mode:o}").stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)
    from_url = open_backend(f"file://{root}", {"file_mode": "0640"})
    assert isinstance(from_url, PosixBackend) and from_url.files.file_mode == 0o640
    with pytest.raises(ConfigError):
        open_backend(f"file://{root}", {"file_mode": "rw"})


_APPEND_AS_NOBODY = """
import json, os, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "ab") as fh:
            fh.write(b"!")
        out[path] = "ok"
    except OSError as exc:
        out[path] = exc.errno
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_normal_user_cannot_append_to_a_committed_file() -> None:
    """Read-only bytes: ``>>`` on a committed file fails for its owner's peers too; a
    0666 file beside it (the control) shows the directory itself is reachable."""
    outer = tempfile.mkdtemp(prefix="datasync-mode-")
    try:
        os.chmod(outer, 0o755)
        backend = PosixBackend(outer, lustre=False)
        writer = backend.begin("committed", 1, 1)
        writer.put_part(0, b"x")
        writer.commit()
        control = Path(outer, "control")
        control.write_bytes(b"x")
        control.chmod(0o666)
        done = subprocess.run(
            [sys.executable, "-c", _APPEND_AS_NOBODY, f"{outer}/committed", str(control)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {f"{outer}/committed": errno.EACCES, str(control): "ok"}
        assert Path(outer, "committed").read_bytes() == b"x"
    finally:
        subprocess.run(["rm", "-rf", outer], check=True)


def test_commit_can_be_repeated_after_a_failure_past_the_rename(
    backend: PosixBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that renamed but failed to flush the directory is finished by a retry
    (the inode tells the rename already happened), not refused."""
    from datasync.backends.posix import writer as writer_module
    from datasync.backends.posix.io import fsync_dir as real

    calls: list[str] = []

    def flaky(path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected")
        real(path)

    monkeypatch.setattr(writer_module, "fsync_dir", flaky)
    w = backend.begin("retried", 3, 3)
    w.put_part(0, b"abc")
    with pytest.raises(TransientError):
        w.commit()
    info = w.commit()
    assert info == backend.stat("retried")
    assert (root / "retried").read_bytes() == b"abc"
    assert list(backend.partial_uploads()) == []


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``mnt`` (made here) with mount ``options``, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI machines run tests as root)")
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, f"ds-{uuid.uuid4().hex[:6]}", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_tmpfs(root: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted inside the root: a real ENOSPC and a real cross-device link."""
    with mounted_tmpfs(root / "small", "size=1m") as mnt:
        yield mnt


def test_a_read_only_mount_is_permission_denied(backend: PosixBackend, root: Path) -> None:
    """EROFS is permanent ``PermissionDenied``: a read-only mount refuses as a mode does."""
    with mounted_tmpfs(root / "ro", "ro,size=1m"):
        with pytest.raises(PermissionDenied) as caught:
            backend.begin("ro/new.bin", 1, 1)
        assert not caught.value.retryable
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.__cause__.errno == errno.EROFS


def test_no_space_is_reported_at_begin_and_leaves_nothing(
    backend: PosixBackend, small_tmpfs: Path
) -> None:
    with pytest.raises(NoSpace) as caught:
        backend.begin("small/huge.bin", 8 * 1024 * 1024, 1024 * 1024)
    assert caught.value.retryable  # between a task's attempts only (datasync.retry)
    assert "small/huge.bin" in str(caught.value)
    assert list(small_tmpfs.iterdir()) == []


def test_link_across_devices_falls_back_to_a_copy(
    backend: PosixBackend, root: Path, small_tmpfs: Path
) -> None:
    (root / "blob").write_bytes(b"abc")
    info = backend.link("blob", "small/view")
    assert info.size == 3
    assert (small_tmpfs / "view").read_bytes() == b"abc"
    assert (small_tmpfs / "view").stat().st_dev != (root / "blob").stat().st_dev
    assert [p.name for p in small_tmpfs.iterdir()] == ["view"]


def test_link_new_across_devices_copies_and_re_hashes(
    backend: PosixBackend, root: Path, small_tmpfs: Path
) -> None:
    (root / "blob").write_bytes(b"abc")
    good = f"xxh3-128:{xxhash.xxh3_128(b'abc').hexdigest()}"
    assert backend.link_new("blob", "small/v/view", expect_digest=good) is True
    copied = small_tmpfs / "v" / "view"
    assert copied.read_bytes() == b"abc"
    assert copied.stat().st_mode & 0o777 == 0o444
    assert copied.stat().st_dev != (root / "blob").stat().st_dev
    with pytest.raises(Conflict):
        backend.link_new("blob", "small/v/view", expect_digest=good)
    bad = f"xxh3-128:{xxhash.xxh3_128(b'abd').hexdigest()}"
    with pytest.raises(ChecksumMismatch):
        backend.link_new("blob", "small/v/other", expect_digest=bad)
    assert sorted(p.name for p in (small_tmpfs / "v").iterdir()) == ["view"]  # no temp left


def test_exchange_swaps_directories_on_a_file_system_that_can(
    backend: PosixBackend, small_tmpfs: Path
) -> None:
    (small_tmpfs / "a").mkdir()
    (small_tmpfs / "b").mkdir()
    (small_tmpfs / "a" / "only-in-a").write_bytes(b"")
    assert backend.exchange("small/a", "small/b") is True
    assert [p.name for p in (small_tmpfs / "b").iterdir()] == ["only-in-a"]
    assert list((small_tmpfs / "a").iterdir()) == []


def test_rename_tree_onto_a_non_empty_directory_is_a_conflict(
    backend: PosixBackend, root: Path
) -> None:
    (root / "src").mkdir()
    (root / "dst").mkdir()
    (root / "dst" / "keep").write_bytes(b"k")
    with pytest.raises(Conflict) as caught:
        backend.rename_tree("src", "dst")
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (root / "dst" / "keep").read_bytes() == b"k"


_segment = st.text(alphabet="a-.0é_ +", min_size=1, max_size=3).filter(
    lambda s: s not in (".", "..") and not is_temp_name(s)
)
_key = st.lists(_segment, min_size=1, max_size=3).map("/".join)


@settings(max_examples=60, deadline=None)
@given(st.sets(_key, min_size=1, max_size=25), st.sampled_from(["", "a", "a/", "a-", "é", "a/a"]))
def test_walk_order_matches_sorted_keys(names: set[str], prefix: str) -> None:
    """A directory walk yields exactly ``sorted(keys)``: 'a-b' < 'a/x' < 'ab' included."""
    # POSIX cannot hold both 'a' and 'a/b': drop keys that are directories of others.
    names = {n for n in names if not any(o.startswith(n + "/") for o in names)}
    with tempfile.TemporaryDirectory() as tmp:
        backend = PosixBackend(tmp, lustre=False)
        for name in names:
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        assert [i.key for i in backend.list(prefix)] == sorted(
            n for n in names if n.startswith(prefix)
        )


def test_partial_uploads_are_found_for_the_auditor(backend: PosixBackend, root: Path) -> None:
    crashed = backend.begin("a/b/crashed.bin", 4, 4)
    crashed.put_part(0, b"half")
    done = backend.begin("a/done.bin", 1, 1)
    done.put_part(0, b"x")
    done.commit()
    [(path, token, mtime)] = list(backend.partial_uploads())
    assert token == crashed.token
    assert Path(path) == root / "a" / "b" / temp_name("crashed.bin", crashed.token)
    assert mtime > 0
    crashed.abort()
    assert list(backend.partial_uploads()) == []


def test_abort_racing_put_part_never_writes_into_another_file(
    backend: PosixBackend, tmp_path: Path
) -> None:
    """A part in flight when another thread aborts must not land in a file that reused the
    writer's closed descriptor number (the kernel hands out the lowest free number)."""
    victims = tmp_path / "victims"
    victims.mkdir()
    part = b"x" * 512
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the window is hit within a few rounds
    try:
        for round_ in range(40):
            writer = backend.begin(f"k{round_}", len(part) * 4000, len(part))
            stop = threading.Event()

            def pump(w: PosixWriter = writer, stop: threading.Event = stop) -> None:
                index = 0
                while not stop.is_set():
                    with contextlib.suppress(ValueError, StorageError):  # aborted: refused
                        w.put_part(index % 4000, part)
                    index += 1

            threads = [threading.Thread(target=pump) for _ in range(3)]
            for thread in threads:
                thread.start()
            time.sleep(0.002)
            writer.abort()
            fds = [os.open(victims / f"{round_}-{i}", os.O_RDWR | os.O_CREAT) for i in range(20)]
            time.sleep(0.002)
            stop.set()
            for thread in threads:
                thread.join()
            sizes = [os.fstat(fd).st_size for fd in fds]
            for fd in fds:
                os.close(fd)
            assert sizes == [0] * len(fds), f"round {round_}: a part went into another file"
    finally:
        sys.setswitchinterval(old_interval)


def _fds_under(path: Path) -> list[str]:
    """Descriptors of this process that point below ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                found.append(target)
    return found


def test_close_releases_the_descriptor_and_the_upload_can_resume(
    backend: PosixBackend, root: Path
) -> None:
    before = len(os.listdir("/proc/self/fd"))
    writers = []
    for i in range(20):  # as many chunk tasks, each writing one part and not committing
        w = backend.begin(f"big/{i}.bin", 8, 4)
        w.put_part(0, b"abcd")
        w.close()
        w.close()  # idempotent
        writers.append(w)
    assert _fds_under(root) == []
    assert len(os.listdir("/proc/self/fd")) <= before
    # The temp stays: the next worker resumes the upload by its token and commits it.
    resumed = backend.begin("big/0.bin", 8, 4, token=writers[0].token)
    resumed.put_part(1, b"efgh")
    resumed.commit()
    assert (root / "big/0.bin").read_bytes() == b"abcdefgh"
    with pytest.raises(ValueError, match="already committed or aborted"):
        writers[1].commit()
    assert _fds_under(root) == []


def test_a_dropped_writer_does_not_leak_its_descriptor(backend: PosixBackend, root: Path) -> None:
    w = backend.begin("dropped.bin", 4, 4)
    w.put_part(0, b"abcd")
    assert len(_fds_under(root)) == 1
    del w
    assert _fds_under(root) == []


@pytest.mark.parametrize("mode", ["fsync", "syncfs"])
def test_group_commit_publishes_a_batch_with_few_flushes(root: Path, mode: str) -> None:
    backend = PosixBackend(root, lustre=False, group_sync=mode)
    group = backend.group_commit()
    keys = [f".datasync/blobs/{i:02x}/{i:02x}/blob{i}" for i in range(40)]
    for i, key in enumerate(keys):
        w = group.begin(key, 3, 3)
        w.put_part(0, b"%03d" % i)
        group.stage(w)
    # Staged bytes are invisible: no key exists, only temps.
    assert list(backend.list("")) == []
    assert len(list(backend.partial_uploads())) == len(keys)
    assert _fds_under(root) == []
    # The new fan-out directories' parents wait for the group's flush, not one fsync each.
    assert str(root / ".datasync/blobs") in group.dirs
    infos = group.commit_all()
    assert sorted(infos) == sorted(keys)
    for i, key in enumerate(keys):
        assert (root / key).read_bytes() == b"%03d" % i
        assert infos[key] == backend.stat(key)
    assert list(backend.partial_uploads()) == []
    if mode == "syncfs":
        assert group.flushes == 2  # one before the renames, one after
    else:
        # One fsync per file, then each distinct directory once (40 leaves, 40 middle
        # directories, .datasync/blobs and .datasync and the root), not one per file.
        assert group.flushes == 40 + 40 + 40 + 3
    assert group.commit_all() == {}


def test_group_commit_failure_removes_the_unrenamed_temps(
    backend: PosixBackend, root: Path
) -> None:
    group = backend.group_commit()
    for key in ("g/a", "g/b", "g/c"):
        w = group.begin(key, 1, 1)
        w.put_part(0, b"x")
        group.stage(w)
    (root / "g/b/in-the-way").mkdir(parents=True)  # the rename onto g/b now fails
    with pytest.raises(StorageError):
        group.commit_all()
    # g/a was renamed (never recorded: harmless), the others' temps are gone.
    assert (root / "g/a").read_bytes() == b"x"
    assert not (root / "g/c").exists()
    assert list(backend.partial_uploads()) == []


def test_group_sync_option_is_checked_and_auto_picks_syncfs_on_local_disks(root: Path) -> None:
    with pytest.raises(ValueError, match="group_sync"):
        PosixBackend(root, lustre=False, group_sync="sometimes")
    mountinfo = root.parent / "mountinfo"
    mountinfo.write_text(f"36 35 98:0 / {root} rw - nfs4 server:/export rw\n")
    assert PosixBackend(root, lustre=False, mountinfo=str(mountinfo)).group_sync == "fsync"
    mountinfo.write_text(f"36 35 98:0 / {root} rw - ext4 /dev/vda rw\n")
    assert PosixBackend(root, lustre=False, mountinfo=str(mountinfo)).group_sync == "syncfs"
