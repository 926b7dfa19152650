"""Diff of two versions as a streaming merge of two path-ordered entry streams.

Both inputs must be strictly ascending by path (UTF-8 byte order, which for ``str`` equals
code point order, so Python's ``<`` agrees with the database's bytewise collation).
Memory is O(1) in the manifest sizes: only the current row of each side is held.
A file is *changed* when its size or digest differs; chunk lists follow from those.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["Change", "ChangeKind", "merge_changes"]

ChangeKind = Literal["added", "removed", "changed"]
# (path, size, digest) as read from an ``ORDER BY path`` cursor.
Row = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    path: str
    old_size: int | None = None
    old_digest: str | None = None
    new_size: int | None = None
    new_digest: str | None = None


def merge_changes(old: Iterable[Row], new: Iterable[Row]) -> Iterator[Change]:
    """Yield the changes from ``old`` to ``new`` in path order."""
    old_it, new_it = iter(old), iter(new)
    a = next(old_it, None)
    b = next(new_it, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield Change("removed", a[0], old_size=a[1], old_digest=a[2])
            a = next(old_it, None)
        elif a is None or b[0] < a[0]:
            yield Change("added", b[0], new_size=b[1], new_digest=b[2])
            b = next(new_it, None)
        else:
            if a[1] != b[1] or a[2] != b[2]:
                yield Change("changed", a[0], a[1], a[2], b[1], b[2])
            a = next(old_it, None)
            b = next(new_it, None)
