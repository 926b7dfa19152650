"""POSIX views: hard links from the blob store, published by one atomic rename or swap.

Through the backend's ``SupportsLocalTree`` only (one errno mapping, in the backend):

1. ``make_dirs(<dataset>)``: every component must be a real directory (never a symlink
   or file a user made: ``Conflict``), so nothing is written through a user's link;
2. leftover ``.staging-<version-id>-*`` directories of killed publishers are removed;
3. every file is hard-linked from the blob store into a fresh staging directory
   (``link_new``; a verified copy where linking is impossible), every directory of the
   staging tree is fsynced, and its directories are made read-only (0555; blob files are
   0444 already), so a user's ``>>`` or ``rm`` in a view fails;
4. the staging directory becomes ``<dataset>/<version-id>`` in one step: a rename when
   there is no view yet, else an atomic exchange with the old view (a republish after a
   repair), whose tree is then removed. Where the file system cannot exchange, the old
   view is renamed aside first: readers then see the view missing for an instant, never
   a mix of old and new files.

A reader never sees a partial version (invariant 3). Labels are handled in ``labels``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

from datasync.backends.base import SupportsLocalTree
from datasync.errors import Conflict
from datasync.transfer.failpoints import failpoint
from datasync.transfer.layout import staging_prefix, view_prefix
from datasync.transfer.views.model import PublishResult, ViewFile

__all__ = ["publish_posix"]


def publish_posix(
    tree: SupportsLocalTree,
    dataset: str,
    version_id: str,
    files: Callable[[], Iterable[ViewFile]],
) -> PublishResult:
    final = view_prefix(dataset, version_id)
    tree.make_dirs(dataset)
    stale = staging_prefix(dataset, version_id).rsplit("/", 1)[1]
    for name in tree.list_dir(dataset):
        if name.startswith(stale):
            tree.remove_tree(f"{dataset}/{name}")
    staging = staging_prefix(dataset, version_id) + secrets.token_hex(6)
    tree.make_dirs(staging)
    n = nbytes = copied = 0
    for f in files():
        copied += tree.link_new(f.key, f"{staging}/{f.path}", expect_digest=f.digest)
        n += 1
        nbytes += f.size
        if n == 1:
            failpoint("mid_publish")
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
