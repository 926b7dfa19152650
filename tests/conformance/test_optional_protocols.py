"""The optional protocols of ``datasync/backends/base.py``: ``Writer.close``,
``SupportsGroupCommit``, ``SupportsPutSmall``, ``SupportsLocalTree`` and
``SupportsPartProofs``.

Tests of an optional protocol are parametrized over the kinds that declare it
(``GROUP_COMMIT_KINDS``, ``PUT_SMALL_KINDS``, ``LOCAL_TREE_KINDS``, ``PART_PROOF_KINDS``),
so nothing is skipped;
``test_optional_protocols_match_the_tables`` runs on every kind and fails when a backend
declares something the tables do not say (or the reverse), or when its capability flag and
``isinstance`` disagree.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import xxhash

from datasync.backends.base import (
    Backend,
    PartLayout,
    SmallPut,
    SupportsGroupCommit,
    SupportsLocalTree,
    SupportsPartProofs,
    SupportsPutSmall,
)
from datasync.errors import Conflict, InvalidPath, NotFound
from tests.conformance.conftest import (
    BYTES_PROOF_KINDS,
    GROUP_COMMIT_KINDS,
    LOCAL_TREE_KINDS,
    PART_PROOF_KINDS,
    PUT_SMALL_KINDS,
    emulator_kinds,
)
from tests.conformance.test_backend_contract import part_size_for, payload, put, read_all


def digest(data: bytes) -> str:
    return f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"


def test_optional_protocols_match_the_tables(backend: Backend, backend_kind: str) -> None:
    caps = backend.capabilities
    assert caps.group_commit is (backend_kind in GROUP_COMMIT_KINDS)
    assert isinstance(backend, SupportsGroupCommit) is caps.group_commit
    assert caps.local_tree is (backend_kind in LOCAL_TREE_KINDS)
    assert isinstance(backend, SupportsLocalTree) is caps.local_tree
    assert caps.small_puts is (backend_kind in PUT_SMALL_KINDS)
    assert isinstance(backend, SupportsPutSmall) is caps.small_puts
    assert caps.verified_writes is (backend_kind in PART_PROOF_KINDS)


def test_writer_close_keeps_the_upload_resumable(backend: Backend) -> None:
    """``close()`` releases the writer's local resources; another writer resumes the token."""
    ps = part_size_for(backend, 64 * 1024)
    size = ps + 10
    layout = PartLayout(size, ps)
    data = payload(30, size)
    first = backend.begin("closed.bin", size, ps)
    first.put_part(0, data[: layout.length(0)])
    first.close()
    first.close()  # idempotent
    with pytest.raises(NotFound):
        backend.stat("closed.bin")
    second = backend.begin("closed.bin", size, ps, token=first.token)
    second.put_part(1, data[layout.offset(1) :])
    if backend.capabilities.lists_parts:
        assert second.durable_parts() == {0, 1}
    else:
        second.put_part(0, data[: layout.length(0)])  # the engine's chunk map would say so
    second.commit()
    assert read_all(backend, "closed.bin") == data


# -- part proofs -------------------------------------------------------------------------


def _resume_with_proofs(backend: Backend, *, tamper: bool = False, drop: bool = False) -> bool:
    """One writer sends parts 0 and 2, another (same upload) accepts their proofs, sends
    part 1 and commits; ``tamper`` hands on, for part 2, the proof of other bytes of the
    same length; ``drop`` hands on, for part 2, a malformed proof (ignored) and moves its
    real proof to an index past the last part (its task was killed before recording
    it). Returns whether the commit was ``verified``; the object must hold the data
    either way."""
    ps = part_size_for(backend, 64 * 1024)
    size = 3 * ps - 7
    layout = PartLayout(size, ps)
    data = payload(41, size)

    def chunk(i: int) -> bytes:
        return data[layout.offset(i) : layout.offset(i) + layout.length(i)]

    first = backend.begin("proved.bin", size, ps)
    assert isinstance(first, SupportsPartProofs)
    first.put_part(0, chunk(0))
    first.put_part(2, chunk(2))
    proofs = {i: first.part_proof(i) for i in (0, 2)}
    assert first.part_proof(1) is None  # not sent here
    if tamper:
        other = backend.begin("other.bin", size, ps)
        assert isinstance(other, SupportsPartProofs)
        other.put_part(2, bytes(layout.length(2)))
        proofs[2] = other.part_proof(2)
        other.abort()
    sent = {i: p for i, p in proofs.items() if p is not None}
    assert sent.keys() == {0, 2}, proofs  # the store showed it got each part
    if drop:
        sent[layout.count] = sent[2]
        sent[2] = "not a proof"
    second = backend.begin("proved.bin", size, ps, token=first.token)
    assert isinstance(second, SupportsPartProofs)
    second.accept_part_proofs(sent)
    second.put_part(1, chunk(1))
    verified = second.commit().verified
    assert read_all(backend, "proved.bin") == data
    return verified


@pytest.mark.parametrize("backend_kind", emulator_kinds(PART_PROOF_KINDS))
def test_a_resumed_commit_is_verified_by_the_proofs_of_the_parts_others_sent(
    backend: Backend,
) -> None:
    """The proof of a part another writer of the upload sent (a ``chunks`` task records
    it in the chunk map) lets the writer that commits prove the object without a re-read;
    without the proofs it cannot (``test_a_commit_is_verified_only_when...``)."""
    assert _resume_with_proofs(backend, tamper=False) is True


@pytest.mark.parametrize("backend_kind", emulator_kinds(PART_PROOF_KINDS))
def test_a_part_without_a_proof_leaves_the_commit_unverified(backend: Backend) -> None:
    """Every part needs a proof: one durable but unproved (and a proof for an index the
    upload does not have) leaves the commit unverified, so the executor re-reads."""
    assert _resume_with_proofs(backend, drop=True) is False


@pytest.mark.parametrize("backend_kind", emulator_kinds(BYTES_PROOF_KINDS))
def test_a_proof_of_other_bytes_proves_nothing(backend: Backend) -> None:
    """Where a proof names the part's bytes, one that does not match what the committed
    object is made of leaves the commit unverified: the executor then re-reads."""
    assert _resume_with_proofs(backend, tamper=True) is False


# -- group commit ------------------------------------------------------------------------


@pytest.mark.parametrize("backend_kind", GROUP_COMMIT_KINDS)
def test_group_commit_publishes_together(backend: Backend) -> None:
    assert isinstance(backend, SupportsGroupCommit)
    group = backend.group_commit()
    blobs = {f"g/{i:02d}/blob": payload(40 + i, 100 + i) for i in range(12)}
    for key, data in blobs.items():
        writer = group.begin(key, len(data), len(data))
        writer.put_part(0, data)
        group.stage(writer)
    assert list(backend.list("g/")) == []  # nothing visible before commit_all
    infos = group.commit_all()
    assert sorted(infos) == sorted(blobs)
    for key, data in blobs.items():
        assert read_all(backend, key) == data
        assert infos[key] == backend.stat(key)


# -- put_small -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_kind", PUT_SMALL_KINDS)
def test_put_small_commits_each_object_and_reads_it_back(backend: Backend) -> None:
    assert isinstance(backend, SupportsPutSmall)
    put(backend, "s/00/blob", b"old bytes, replaced")
    blobs = {f"s/{i:02d}/blob": payload(60 + i, 100 * i) for i in range(8)}  # s/00 is empty
    results = backend.put_small([(k, memoryview(v)) for k, v in blobs.items()])
    assert len(results) == len(blobs)
    for (key, data), got in zip(blobs.items(), results, strict=True):
        assert isinstance(got, SmallPut), got
        assert got.digest == digest(data), "the digest of the bytes read back"
        assert got.info == backend.stat(key)
        assert read_all(backend, key) == data
    assert sorted(o.key for o in backend.list("s/")) == sorted(blobs), "no temp is listed"


@pytest.mark.parametrize("backend_kind", PUT_SMALL_KINDS)
def test_put_small_fails_an_item_alone(backend: Backend) -> None:
    assert isinstance(backend, SupportsPutSmall)
    items = [("ok/a", b"a" * 10), ("bad/../key", b"b"), ("ok/c", b"c" * 30)]
    a, bad, c = backend.put_small(items)
    assert isinstance(bad, InvalidPath)
    assert isinstance(a, SmallPut) and a.digest == digest(b"a" * 10)
    assert isinstance(c, SmallPut) and c.digest == digest(b"c" * 30)
    assert sorted(o.key for o in backend.list("")) == ["ok/a", "ok/c"]


# -- local tree ----------------------------------------------------------------------------


@pytest.fixture
def tree(backend: Backend) -> SupportsLocalTree:
    assert isinstance(backend, SupportsLocalTree)
    return backend


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_keys_are_files_under_root_and_committed_bytes_are_read_only(
    backend: Backend, tree: SupportsLocalTree
) -> None:
    """Committed files are 0444 (``file_mode``), whichever way they were made."""
    root = Path(tree.root)
    put(backend, "blobs/a", b"abc")
    assert (root / "blobs/a").read_bytes() == b"abc"
    backend.copy("blobs/a", "copies/a")
    assert isinstance(backend, SupportsGroupCommit)
    group = backend.group_commit()
    writer = group.begin("grouped/a", 3, 3)
    writer.put_part(0, b"xyz")
    group.stage(writer)
    group.commit_all()
    for key in ("blobs/a", "copies/a", "grouped/a"):
        assert _mode(root / key) == 0o444, key
    tree.make_durable("blobs/a")
    backend.delete("blobs/a")  # deleting needs the directory's permission only
    assert not (root / "blobs/a").exists()


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_link_new_links_at_new_names_only(backend: Backend, tree: SupportsLocalTree) -> None:
    root = Path(tree.root)
    put(backend, "blobs/b", b"shared")
    assert tree.link_new("blobs/b", "view/d/e/f", expect_digest=digest(b"shared")) is False
    assert (root / "view/d/e/f").stat().st_ino == (root / "blobs/b").stat().st_ino
    with pytest.raises(Conflict):  # an existing name is never replaced
        tree.link_new("blobs/b", "view/d/e/f", expect_digest=digest(b"shared"))
    put(backend, "other", b"mine")
    with pytest.raises(Conflict):
        tree.link_new("blobs/b", "other", expect_digest=digest(b"shared"))
    assert read_all(backend, "other") == b"mine"
    with pytest.raises(Conflict):  # a file where a directory is needed
        tree.link_new("blobs/b", "other/below", expect_digest=digest(b"shared"))
    with pytest.raises(NotFound):
        tree.link_new("blobs/missing", "view/g", expect_digest=digest(b""))
    with pytest.raises(InvalidPath):
        tree.link_new("blobs/b", "view/../escape", expect_digest=digest(b"shared"))


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_link_many_links_a_batch_and_shows_what_each_link_is(
    backend: Backend, tree: SupportsLocalTree
) -> None:
    root = Path(tree.root)
    put(backend, "blobs/m", b"many")
    blob = backend.stat("blobs/m")
    made = tree.link_many([("blobs/m", "v/a/1"), ("blobs/missing", "v/a/2"), ("blobs/m", "v/b/3")])
    assert [None if m is None else (m.key, m.size, m.etag) for m in made] == [
        ("v/a/1", 4, backend.stat("v/a/1").etag),
        None,  # no source: nothing made, the caller decides
        ("v/b/3", 4, backend.stat("v/b/3").etag),
    ]
    assert (root / "v/b/3").stat().st_ino == (root / "blobs/m").stat().st_ino
    assert not (root / "v/a/2").exists()
    # A link is the blob's own inode: it shows the token recorded for the blob.
    assert made[0] is not None and (made[0].size, made[0].etag) == (blob.size, blob.etag)
    with pytest.raises(Conflict):  # an existing name is never replaced
        tree.link_many([("blobs/m", "v/a/1")])
    with pytest.raises(InvalidPath):
        tree.link_many([("blobs/m", "v/../escape")])


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_trees_are_synced_renamed_and_exchanged(backend: Backend, tree: SupportsLocalTree) -> None:
    root = Path(tree.root)
    put(backend, "blobs/c", b"c")
    for path in ("a/b/1", "a/b/c/2", "a/3"):
        tree.link_new("blobs/c", f"ds/.staging/{path}", expect_digest=digest(b"c"))
    tree.sync_tree("ds/.staging")
    with pytest.raises(NotFound):
        tree.sync_tree("ds/missing")
    with pytest.raises(Conflict):
        tree.sync_tree("blobs/c")
    tree.rename_tree("ds/.staging", "ds/v1")
    assert (root / "ds/v1/a/b/c/2").read_bytes() == b"c"
    assert not (root / "ds/.staging").exists()
    tree.link_new("blobs/c", "ds/.staging2/x", expect_digest=digest(b"c"))
    with pytest.raises(Conflict):  # onto a non-empty directory
        tree.rename_tree("ds/.staging2", "ds/v1")
    with pytest.raises(NotFound):
        tree.rename_tree("ds/nothing", "ds/v2")
    if tree.exchange("ds/.staging2", "ds/v1"):
        assert (root / "ds/v1/x").exists() and (root / "ds/.staging2/a/3").exists()
    else:  # this file system cannot: nothing moved
        assert (root / "ds/.staging2/x").exists() and (root / "ds/v1/a/3").exists()
    with pytest.raises(NotFound):
        tree.exchange("ds/v1", "ds/none")


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_symlinks_are_made_replaced_and_never_clobber(
    backend: Backend, tree: SupportsLocalTree
) -> None:
    root = Path(tree.root)
    assert tree.read_symlink("drive/tokyo@v1") is None
    tree.set_symlink("drive/tokyo@v1", "tokyo/" + "a" * 64)
    assert os.readlink(root / "drive/tokyo@v1") == "tokyo/" + "a" * 64
    tree.set_symlink("drive/tokyo@v1", "tokyo/" + "b" * 64)  # atomic replace
    tree.set_symlink("drive/tokyo@v1", "tokyo/" + "b" * 64)  # same target: nothing to do
    assert tree.read_symlink("drive/tokyo@v1") == "tokyo/" + "b" * 64
    assert sorted(p.name for p in (root / "drive").iterdir()) == ["tokyo@v1"]  # no temp left
    put(backend, "drive/not-a-link", b"user data")
    with pytest.raises(Conflict):
        tree.set_symlink("drive/not-a-link", "tokyo/x")
    with pytest.raises(Conflict):
        tree.read_symlink("drive/not-a-link")
    assert read_all(backend, "drive/not-a-link") == b"user data"
    (root / "drive/adir").mkdir()
    with pytest.raises(Conflict):
        tree.set_symlink("drive/adir", "tokyo/x")
    for bad in ("/etc", "../up", "a/../../b", ""):
        with pytest.raises(InvalidPath):
            tree.set_symlink("drive/l", bad)
    assert list(backend.list("drive/")) == [backend.stat("drive/not-a-link")]


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_read_only_trees_and_their_removal(backend: Backend, tree: SupportsLocalTree) -> None:
    root = Path(tree.root)
    put(backend, "blobs/d", b"d")
    for path in ("v/a/1", "v/a/b/2", "v/3"):
        tree.link_new("blobs/d", path, expect_digest=digest(b"d"))
    os.symlink("/", root / "v/a/outside")  # never followed by the walk
    tree.set_tree_readonly("v", True)
    dirs = [root / "v", root / "v/a", root / "v/a/b"]
    assert [_mode(d) for d in dirs] == [0o555] * 3
    assert _mode(root / "v/a/1") == 0o444  # files untouched
    assert _mode(Path("/")) != 0o555
    tree.set_tree_readonly("v", False)
    assert [_mode(d) for d in dirs] == [0o755] * 3
    tree.set_tree_readonly("v", True)
    tree.remove_tree("v")  # read-only directories included
    assert not (root / "v").exists()
    assert (root / "blobs/d").read_bytes() == b"d"
    tree.remove_tree("v")  # already gone: fine
    with pytest.raises(Conflict):
        tree.remove_tree("blobs/d")
    with pytest.raises(NotFound):
        tree.set_tree_readonly("v", True)


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_directories_are_made_never_through_a_symlink(
    backend: Backend, tree: SupportsLocalTree, tmp_path: Path
) -> None:
    root = Path(tree.root)
    assert not tree.is_dir("drive/tokyo") and tree.list_dir("drive/tokyo") == []
    tree.make_dirs("drive/tokyo/.staging-x")
    tree.make_dirs("drive/tokyo/.staging-x")  # idempotent
    assert tree.is_dir("drive/tokyo") and tree.list_dir("drive/tokyo") == [".staging-x"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere)
    assert not tree.is_dir("linked"), "a symlink to a directory is not one of ours"
    with pytest.raises(Conflict, match="symlink"):
        tree.make_dirs("linked/sub")
    put(backend, "afile", b"x")
    with pytest.raises(Conflict):
        tree.make_dirs("afile/sub")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("backend_kind", LOCAL_TREE_KINDS)
def test_symlinks_are_removed_only_when_they_are_symlinks(
    backend: Backend, tree: SupportsLocalTree
) -> None:
    root = Path(tree.root)
    tree.set_symlink("ds@v1", "ds/" + "a" * 64)
    tree.remove_symlink("ds@v1")
    assert not os.path.lexists(root / "ds@v1")
    tree.remove_symlink("ds@v1")  # absent: nothing to do
    put(backend, "ds@notes", b"user")
    with pytest.raises(Conflict):
        tree.remove_symlink("ds@notes")
    assert read_all(backend, "ds@notes") == b"user"
