"""Views are published atomically (invariant 3), idempotently, and fall back to copies.

POSIX runs on the real file system (a tmpfs under /dev/shm gives a real EXDEV; 65,000 real
hard links give a real EMLINK). Object stores run on the in-memory backend (same
conformance suite as the real ones) and on moto's S3 server.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import stat
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import xxhash

from datasync.backends.base import Backend, ObjectInfo
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.errors import Conflict, NotFound, SourceChanged, TransientError
from datasync.transfer.layout import COMPLETE_MARKER, blob_key, label_body
from datasync.transfer.views import (
    BlobDamaged,
    BlobsDamaged,
    PublishResult,
    ViewFile,
    publish_view,
    sync_labels,
)
from tests.fixtures.passthrough import PassThrough

VID = "a" * 64
VID2 = "b" * 64
IO_THREADS = 4
IO = cf.ThreadPoolExecutor(IO_THREADS)


def publish(backend: Backend, views: Iterable[ViewFile], vid: str = VID) -> PublishResult:
    return publish_view(backend, "drive/tokyo", vid, lambda: views, io=IO)


def digest(data: bytes) -> str:
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


def put(backend: Backend, key: str, data: bytes) -> None:
    w = backend.begin(key, len(data), max(len(data), 1))
    if data:
        w.put_part(0, data)
    w.commit()


FILES = {
    "cam0/000001.jpg": b"jpeg-1" * 100,
    "cam0/000002.jpg": b"jpeg-2" * 100,
    "lidar/sweep 01.bin": os.urandom(5000),
    "ünïcode/ø.txt": b"non-ascii",
    "empty": b"",
    "copy-of-1.jpg": b"jpeg-1" * 100,  # same blob under two paths
}


def stock(backend: Backend, files: dict[str, bytes] = FILES) -> list[ViewFile]:
    views = []
    for path, data in files.items():
        put(backend, blob_key(digest(data)), data)
        views.append(ViewFile(path, digest(data), len(data), blob_key(digest(data))))
    return views


@pytest.fixture
def posix(tmp_path: Path) -> PosixBackend:
    root = tmp_path / "site"
    root.mkdir()
    return PosixBackend(root)


def xxh128(path: Path) -> str:
    return digest(path.read_bytes())


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# -- POSIX ------------------------------------------------------------------------------------


def test_posix_view_is_read_only_hard_links_renamed_into_place(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    result = publish_view(posix, "drive/tokyo", VID, lambda: views, io=IO)
    final = root / "drive/tokyo" / VID
    assert result.location == str(final) and not result.already
    assert (result.files, result.bytes, result.copied) == (
        len(FILES),
        sum(map(len, FILES.values())),
        0,
    )
    assert tree(final) == FILES
    for v in views:
        assert os.stat(final / v.path).st_ino == os.stat(root / v.key).st_ino, "a hard link"
        assert stat.S_IMODE(os.stat(final / v.path).st_mode) == 0o444
    assert {stat.S_IMODE(os.stat(d).st_mode) for d in [final, *final.rglob("*")] if d.is_dir()} == {
        0o555
    }
    leftovers = [p.name for p in (root / "drive/tokyo").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no staging dir or temp symlink left"


def test_posix_republish_rebuilds_and_swaps_atomically(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    publish(posix, views)
    final = root / "drive/tokyo" / VID
    os.chmod(final / "cam0", 0o755)  # root damages it
    (final / "cam0/000002.jpg").unlink()
    again = publish(posix, views)
    assert not again.already and tree(final) == FILES  # the whole view, swapped in at once
    assert [p.name for p in (root / "drive/tokyo").iterdir()] == [VID]


def test_posix_labels_are_symlinks_next_to_the_dataset(posix: PosixBackend) -> None:
    root = Path(posix.root)
    publish(posix, stock(posix))
    v2 = stock(posix, {"new.bin": b"second version"})
    publish(posix, v2, VID2)
    sync_labels(posix, "drive/tokyo", {"latest": VID, "v1": VID, "gone": None})
    assert os.readlink(root / "drive/tokyo@latest") == f"tokyo/{VID}"
    assert tree(root / "drive/tokyo@v1") == FILES
    sync_labels(posix, "drive/tokyo", {"latest": VID2, "v1": None})
    assert os.readlink(root / "drive/tokyo@latest") == f"tokyo/{VID2}", "moved atomically"
    assert not os.path.lexists(root / "drive/tokyo@v1"), "a label whose view is not here"
    assert tree(root / "drive/tokyo" / VID) == FILES, "the old version is untouched"


def test_posix_labels_never_replace_what_datasync_did_not_make(posix: PosixBackend) -> None:
    root = Path(posix.root)
    publish(posix, stock(posix))
    (root / "drive/tokyo@README").write_text("a user's notes")
    (root / "drive/tokyo@mine").symlink_to("/etc")
    for label in ("README", "mine"):
        with pytest.raises(Conflict):
            sync_labels(posix, "drive/tokyo", {label: VID})
        with pytest.raises(Conflict):
            sync_labels(posix, "drive/tokyo", {label: None})
    assert (root / "drive/tokyo@README").read_text() == "a user's notes"
    assert os.readlink(root / "drive/tokyo@mine") == "/etc"


def test_posix_view_is_never_written_through_a_users_symlink(
    posix: PosixBackend, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (Path(posix.root) / "drive").symlink_to(elsewhere)
    with pytest.raises(Conflict, match="symlink"):
        publish(posix, stock(posix))
    assert list(elsewhere.iterdir()) == []


def test_posix_leftover_staging_of_a_killed_worker_is_cleaned(posix: PosixBackend) -> None:
    views = stock(posix)
    root = Path(posix.root)
    stale = root / "drive/tokyo" / f".staging-{VID}-deadbeef"
    (stale / "cam0").mkdir(parents=True)
    (stale / "cam0/000001.jpg").write_bytes(b"half")
    other_version = root / "drive/tokyo" / f".staging-{VID2}-cafe"
    other_version.mkdir()
    publish(posix, views)
    assert not stale.exists()
    assert other_version.exists(), "another version's staging dir is not ours to remove"
    assert tree(root / "drive/tokyo" / VID) == FILES


def test_posix_publish_checks_each_link_against_the_recorded_token(posix: PosixBackend) -> None:
    """What a link shows is the blob's inode: a token that moved goes to ``check``, which
    may keep the file (a touch) or report damage; all damage is reported after one pass
    and nothing is published."""
    root = Path(posix.root)
    recorded = [replace(v, etag=posix.stat(v.key).etag) for v in stock(posix)]
    touched, rotten = recorded[0], recorded[2]  # cam0/000001.jpg (and copy-of-1.jpg), lidar
    os.utime(root / touched.key, ns=(1, 1))
    os.chmod(root / rotten.key, 0o644)  # what root can do to a read-only blob
    (root / rotten.key).write_bytes(b"X" * rotten.size)
    asked: list[tuple[str, str | None]] = []

    def check(f: ViewFile, seen: ObjectInfo | None) -> BlobDamaged | None:
        assert seen is not None and seen.etag == posix.stat(f.key).etag
        asked.append((f.path, seen.key))
        bad = xxh128(root / seen.key) != f.digest
        return BlobDamaged(f.digest, f.key, "rewritten") if bad else None

    with pytest.raises(BlobsDamaged) as caught:
        publish_view(posix, "drive/tokyo", VID, lambda: recorded, io=IO, check=check)
    assert [d.digest for d in caught.value.damaged] == [rotten.digest]
    assert sorted(path for path, _ in asked) == ["cam0/000001.jpg", "copy-of-1.jpg", rotten.path]
    assert all(f"/.staging-{VID}-" in f"/{key}" for _, key in asked), "the link was checked"
    assert not (root / "drive/tokyo" / VID).exists(), "nothing is published"

    (root / rotten.key).write_bytes(FILES[rotten.path])  # right bytes, a new token again
    asked.clear()
    result = publish_view(posix, "drive/tokyo", VID, lambda: recorded, io=IO, check=check)
    assert tree(Path(result.location)) == FILES and result.copied == 0
    assert len(asked) == 3


def test_posix_blob_that_could_not_be_linked_goes_to_check(posix: PosixBackend) -> None:
    views = stock(posix)
    ghost = ViewFile("ghost.bin", digest(b"ghost"), 5, blob_key(digest(b"ghost")))
    asked: list[str] = []

    def check(f: ViewFile, seen: ObjectInfo | None) -> BlobDamaged | None:
        assert seen is None
        asked.append(f.path)
        return BlobDamaged(f.digest, f.key, "missing")

    twin = replace(ghost, path="ghost-twin.bin")  # the same missing blob: reported once
    with pytest.raises(BlobsDamaged, match="1 blob"):
        publish_view(posix, "drive/tokyo", VID, lambda: [*views, ghost, twin], io=IO, check=check)
    assert asked == ["ghost.bin", "ghost-twin.bin"]
    assert not (Path(posix.root) / "drive/tokyo" / VID).exists()


def test_posix_missing_blob_publishes_nothing(posix: PosixBackend) -> None:
    views = stock(posix)
    views.append(ViewFile("ghost.bin", digest(b"ghost"), 5, blob_key(digest(b"ghost"))))
    with pytest.raises(NotFound, match=blob_key(digest(b"ghost"))):
        publish(posix, views)
    dataset_dir = Path(posix.root) / "drive/tokyo"
    assert not (dataset_dir / VID).exists(), "no partial version is ever visible"


def test_posix_cross_device_falls_back_to_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"datasync-test-{uuid.uuid4().hex[:8]}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same device as the temp dir here")
    root = tmp_path / "site"
    root.mkdir()
    shm.mkdir()
    try:
        # The blob store lives on another file system: os.link gets a real EXDEV.
        (root / ".datasync").symlink_to(shm)
        posix = PosixBackend(root)
        views = stock(posix)
        result = publish(posix, views)
        final = root / "drive/tokyo" / VID
        assert result.copied == len(FILES)
        assert tree(final) == FILES
        assert all(os.stat(final / v.path).st_nlink == 1 for v in views)
        assert not [p for p in final.rglob(".*tmp-*")], "copies go through temp + rename"
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.slow
def test_posix_link_limit_falls_back_to_copy(posix: PosixBackend, tmp_path: Path) -> None:
    data = b"very popular frame"
    views = stock(posix, {"popular.jpg": data})
    blob = Path(posix.root) / views[0].key
    junk = Path(posix.root) / "junk"
    junk.mkdir()
    n = 1
    try:
        while True:  # ext4 stops at 65,000 links: a real EMLINK
            os.link(blob, junk / str(n))
            n += 1
            if n > 70_000:
                pytest.skip("this file system has no small link limit")
    except OSError as exc:
        assert exc.errno == __import__("errno").EMLINK
    result = publish(posix, views)
    assert result.copied == 1
    view_file = Path(posix.root) / "drive/tokyo" / VID / "popular.jpg"
    assert view_file.read_bytes() == data and os.stat(view_file).st_nlink == 1


# -- object stores ------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    name = f"mat-{uuid.uuid4().hex[:8]}"
    yield MemoryBackend(name)
    drop_store(name)


def objects(backend: Backend, prefix: str) -> dict[str, bytes]:
    return {
        o.key[len(prefix) :]: backend.read_range(o.key, 0, o.size) for o in backend.list(prefix)
    }


def _object_store_publish(backend: Backend) -> None:
    views = stock(backend)
    prefix = f"drive/tokyo/{VID}/"
    result = publish(backend, views)
    assert not result.already and result.files == len(FILES)
    got = objects(backend, prefix)
    marker = json.loads(got.pop(COMPLETE_MARKER))
    assert got == FILES
    assert marker["version_id"] == VID and marker["files"] == len(FILES)
    sync_labels(backend, "drive/tokyo", {"latest": VID})
    label = json.loads(backend.read_range("drive/tokyo@latest", 0, 1000))
    assert label["version_id"] == VID
    assert publish(backend, views).already
    sync_labels(backend, "drive/tokyo", {"latest": None})
    with pytest.raises(NotFound):
        backend.stat("drive/tokyo@latest")


def test_object_store_view_with_marker_last_memory(memory: MemoryBackend) -> None:
    _object_store_publish(memory)


def test_object_store_view_on_s3(request: pytest.FixtureRequest) -> None:
    from tests.fixtures.emulators import make_s3_backend

    _object_store_publish(make_s3_backend(request))


def test_object_store_labels_never_replace_a_users_object(memory: MemoryBackend) -> None:
    put(memory, "drive/tokyo@prod", b"someone else's object")
    with pytest.raises(Conflict):
        sync_labels(memory, "drive/tokyo", {"prod": VID})
    assert memory.read_range("drive/tokyo@prod", 0, 100) == b"someone else's object"
    put(memory, "drive/tokyo@ours", label_body("drive/tokyo", "ours", VID2))
    sync_labels(memory, "drive/tokyo", {"ours": VID})
    assert json.loads(memory.read_range("drive/tokyo@ours", 0, 999))["version_id"] == VID


def test_object_store_marker_is_written_after_every_file(memory: MemoryBackend) -> None:
    views = stock(memory)
    # A copy fails half-way: files may exist, the marker must not.
    memory.inject(lambda: TransientError("injected: reset"), times=1, ops={"copy"})
    with pytest.raises(TransientError):
        publish(memory, views)
    with pytest.raises(NotFound):
        memory.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")
    publish(memory, views)
    memory.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")


def test_object_store_leftover_wrong_copy_is_replaced(memory: MemoryBackend) -> None:
    views = stock(memory)
    # A killed publisher (or anything else) left wrong bytes at a view key.
    put(memory, f"drive/tokyo/{VID}/cam0/000001.jpg", b"X" * 600)
    publish(memory, views)
    assert objects(memory, f"drive/tokyo/{VID}/")["cam0/000001.jpg"] == FILES["cam0/000001.jpg"]


def test_object_store_damaged_blob_is_reported_as_such(memory: MemoryBackend) -> None:
    data = b"true bytes"
    put(memory, blob_key(digest(data)), b"rotten bytes")  # the blob store itself is corrupt
    views = [ViewFile("f.bin", digest(data), len(data), blob_key(digest(data)))]
    with pytest.raises(BlobsDamaged, match="no longer hashes") as caught:
        publish(memory, views)
    assert [d.digest for d in caught.value.damaged] == [digest(data)]
    assert list(memory.list(f"drive/tokyo/{VID}/")) == [], "nothing unverified is left"


def test_object_store_every_damaged_blob_is_found_in_one_pass(memory: MemoryBackend) -> None:
    """A view's copies are the check of its blobs: a missing blob and a rotten one are
    both named by one publish, which writes no marker; the right files stay copied."""
    views = stock(memory)
    rotten, missing = views[2], views[3]  # blobs no other file of the view shares
    memory.delete(rotten.key)
    put(memory, rotten.key, b"R" * rotten.size)
    memory.delete(missing.key)
    with pytest.raises(BlobsDamaged) as caught:
        publish(memory, views)
    assert {d.digest for d in caught.value.damaged} == {rotten.digest, missing.digest}
    with pytest.raises(NotFound):
        memory.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")
    right = [f for f in views if f not in (rotten, missing)]
    kept = objects(memory, f"drive/tokyo/{VID}/")
    assert kept == {f.path: FILES[f.path] for f in right}


class _CountingCopies(PassThrough):
    """The store, counting the copies made of each key (everything else passes through)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.copies: Counter[str] = Counter()

    def copy(self, src_key: str, dst_key: str, **kwargs: Any) -> ObjectInfo:
        self.copies[src_key] += 1
        return self.inner.copy(src_key, dst_key, **kwargs)


def test_object_store_a_damaged_blob_many_files_share_is_judged_once(
    memory: MemoryBackend,
) -> None:
    """200 identical frames share one blob, which rots: it is copied and hashed by a few
    files at most (those in flight on the I/O pool when the first found it damaged), not by
    all 200, and reported once; the right blob's files are all copied."""
    frame, other = b"black frame" * 50, b"calibration"
    files = {f"cam0/{i:06d}.jpg": frame for i in range(200)} | {"calib.json": other}
    views = stock(memory, files)
    rotten = views[0].key
    memory.delete(rotten)
    put(memory, rotten, b"X" * len(frame))
    counting = _CountingCopies(memory)
    with pytest.raises(BlobsDamaged) as caught:
        publish(cast(Backend, counting), views)
    assert [d.digest for d in caught.value.damaged] == [digest(frame)]
    assert 1 <= counting.copies[rotten] <= IO_THREADS
    assert counting.copies[blob_key(digest(other))] == 1
    assert objects(memory, f"drive/tokyo/{VID}/") == {"calib.json": other}


def test_object_store_copies_pin_the_recorded_version_and_survive_a_touch(
    memory: MemoryBackend,
) -> None:
    """Copies are pinned to the token recorded at verification: a blob rewritten since
    with the same bytes (a touch) is copied as it is now and passes its re-hash; one
    rewritten with other bytes is damaged."""
    views = [replace(f, etag=memory.stat(f.key).etag) for f in stock(memory)]
    touched, rotten = views[2], views[3]
    put(memory, touched.key, FILES[touched.path])
    put(memory, rotten.key, b"?" * rotten.size)
    assert memory.stat(touched.key).etag != touched.etag
    with pytest.raises(BlobsDamaged) as caught:
        publish(memory, views)
    assert [d.digest for d in caught.value.damaged] == [rotten.digest]
    put(memory, rotten.key, FILES[rotten.path])  # the re-plan moves it again
    publish(memory, views)
    got = objects(memory, f"drive/tokyo/{VID}/")
    got.pop(COMPLETE_MARKER)
    assert got == FILES


def test_object_store_leftover_replaced_after_the_listing_is_copied_again(
    memory: MemoryBackend,
) -> None:
    """A killed publisher's copy that changes between the listing and its re-read (the
    read is pinned to the listed version) is copied again, neither trusted nor fatal."""
    view = next(f for f in stock(memory) if f.path == "cam0/000001.jpg")
    key = f"drive/tokyo/{VID}/{view.path}"
    put(memory, key, b"X" * view.size)  # what a killed publisher left
    # Its pinned re-read finds another version (replaced after the listing).
    memory.inject(lambda: SourceChanged("injected: replaced since listed"), ops={"read_range"})
    result = publish(memory, [view])
    assert result.files == 1 and not result.already
    assert objects(memory, f"drive/tokyo/{VID}/")[view.path] == FILES[view.path]


@pytest.mark.parametrize("store", ["memory", "s3", "azure", "gcs"])
def test_object_store_view_never_shows_bytes_added_to_its_blob_after_verification(
    store: str, memory: MemoryBackend, request: pytest.FixtureRequest
) -> None:
    """A blob that grew since its token was recorded (the right bytes plus a tail) must
    not reach a view: the copy's size is the copy's own, never the pin's, even on a store
    that ignores the copy's source condition (moto ignores CopySourceIfMatch)."""
    from tests.fixtures import emulators as em

    backend: Backend = memory
    if store == "s3":
        backend = em.make_s3_backend(request)
    elif store == "azure":
        backend = em.make_azure_backend(request)
    elif store == "gcs":
        backend = em.make_gcs_backend(request)
    data = b"true bytes"
    key = blob_key(digest(data))
    put(backend, key, data)
    view = ViewFile("f.bin", digest(data), len(data), key, backend.stat(key).etag)
    put(backend, key, data + b"UNVERIFIED TAIL")
    with pytest.raises(BlobsDamaged) as caught:
        publish(backend, [view])
    assert [d.digest for d in caught.value.damaged] == [view.digest]
    with pytest.raises(NotFound):
        backend.stat(f"drive/tokyo/{VID}/{COMPLETE_MARKER}")
    assert list(backend.list(f"drive/tokyo/{VID}/")) == [], "nothing unverified is left"
