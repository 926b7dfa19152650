"""POSIX views: hard links from the blob store, published by one atomic rename or swap.

Through the backend's ``SupportsLocalTree`` only (one errno mapping, in the backend):

1. ``make_dirs(<dataset>)``: every component must be a real directory (never a symlink
   or file a user made: ``Conflict``), so nothing is written through a user's link;
2. leftover ``.staging-<version-id>-*`` directories of killed publishers are removed;
3. every file is hard-linked from the blob store into a fresh staging directory, a batch
   per backend call (``link_many``), and what each new name shows (size and version
   token: the blob's own inode, ``mtime-ino-size``) is compared with what was recorded
   when the blob was verified. A file that differs, or could not be linked, goes to the
   caller's ``check``: a blob that was only touched is re-hashed *as linked* and kept; a
   missing or rewritten one is damage, and after the pass every damaged blob is reported
   at once (``BlobsDamaged``) and nothing is published. Where linking is impossible the
   checked blob is copied and re-hashed (``link_new``);
4. every directory of the staging tree is fsynced and made read-only (0555; blob files
   are 0444 already), so a user's ``>>`` or ``rm`` in a view fails;
5. the staging directory becomes ``<dataset>/<version-id>`` in one step: a rename when
   there is no view yet, else an atomic exchange with the old view (a republish after a
   repair), whose tree is then removed. Where the file system cannot exchange, the old
   view is renamed aside first: readers then see the view missing for an instant, never
   a mix of old and new files.

A new version is linked from the blob store, never from the previous version's view: a
file a user replaced there (the owner can lift 0555) is not the blob, and checking each
one would cost the same stat a link from the blob store makes anyway.

A reader never sees a partial version (invariant 3). Labels are handled in ``labels``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from datasync.backends.base import ObjectInfo, SupportsLocalTree
from datasync.errors import Conflict
from datasync.transfer.failpoints import failpoint
from datasync.transfer.layout import staging_prefix, view_prefix
from datasync.transfer.views.model import (
    BlobCheck,
    BlobDamaged,
    BlobsDamaged,
    PublishResult,
    ViewFile,
)

__all__ = ["publish_posix"]

_LINK_BATCH = 1000


def publish_posix(
    tree: SupportsLocalTree,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
    check: BlobCheck | None = None,
) -> PublishResult:
    final = view_prefix(dataset, version_id)
    tree.make_dirs(dataset)
    stale = staging_prefix(dataset, version_id).rsplit("/", 1)[1]
    for name in tree.list_dir(dataset):
        if name.startswith(stale):
            tree.remove_tree(f"{dataset}/{name}")
    staging = staging_prefix(dataset, version_id) + secrets.token_hex(6)
    tree.make_dirs(staging)
    n, nbytes, copied = _link_all(tree, staging, files(), check)
    tree.sync_tree(staging)
    tree.set_tree_readonly(staging, True)
    failpoint("before_rename")
    if not tree.is_dir(final):
        try:
            tree.rename_tree(staging, final)
            return PublishResult(f"{tree.root}/{final}", n, nbytes, copied, already=False)
        except Conflict:
            if not tree.is_dir(final):
                raise
            # A concurrent (zombie) publisher of the same view won: swap ours in anyway,
            # it is just as complete.
    if not tree.exchange(staging, final):
        # Named like staging, so a publisher killed in between cleans it up next time.
        aside = staging_prefix(dataset, version_id) + "old-" + secrets.token_hex(6)
        tree.rename_tree(final, aside)
        tree.rename_tree(staging, final)
        staging = aside
    tree.remove_tree(staging)  # the old view's tree, now under the other name
    return PublishResult(f"{tree.root}/{final}", n, nbytes, copied, already=False)


def _batches(files: Iterable[ViewFile]) -> Iterator[list[ViewFile]]:
    it = iter(files)
    while batch := list(islice(it, _LINK_BATCH)):
        yield batch


def _as_verified(f: ViewFile, info: ObjectInfo) -> bool:
    return info.size == f.size and (f.etag is None or info.etag == f.etag)


def _link_all(
    tree: SupportsLocalTree, staging: str, files: Iterable[ViewFile], check: BlobCheck | None
) -> tuple[int, int, int]:
    """Link every file into ``staging``; ``(files, bytes, copied)``."""
    n = nbytes = copied = 0
    damaged: dict[str, BlobDamaged] = {}  # by digest: a blob many files share, once
    for batch in _batches(files):
        made = tree.link_many([(f.key, f"{staging}/{f.path}") for f in batch])
        for f, info in zip(batch, made, strict=True):
            if info is not None and (check is None or _as_verified(f, info)):
                continue  # linked, and the blob is as it was verified
            found = check(f, info) if check is not None else None
            if found is not None:
                damaged.setdefault(found.digest, found)
            elif info is None:
                copied += tree.link_new(f.key, f"{staging}/{f.path}", expect_digest=f.digest)
        n += len(batch)
        nbytes += sum(f.size for f in batch)
        failpoint("mid_publish")
    if damaged:
        raise BlobsDamaged(list(damaged.values()))
    return n, nbytes, copied
