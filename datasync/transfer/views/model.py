"""Values shared by the view builders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasync.backends.base import ObjectInfo
from datasync.errors import StorageError

__all__ = ["BlobCheck", "BlobDamaged", "BlobsDamaged", "PublishResult", "ViewFile"]


@dataclass(frozen=True, slots=True)
class ViewFile:
    """One file of a view: its path in the version and its blob-store key at the site, with
    the version token recorded when the blob was verified (None: nothing to compare)."""

    path: str
    digest: str
    size: int
    key: str
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class PublishResult:
    location: str  # filesystem path or URL of the version directory
    files: int
    bytes: int
    copied: int  # files copied instead of linked (POSIX) or by read+write (object stores)
    already: bool  # the view was complete before this call


class BlobDamaged(StorageError):
    """A blob a view needs is missing or wrong in the site's blob store: it must move
    again (the publisher marks it bad and re-plans), the view cannot be built from it."""

    retryable = True

    def __init__(self, digest: str, key: str, why: str) -> None:
        super().__init__(f"blob {digest} at {key}: {why}")
        self.digest = digest
        self.key = key
        self.why = why


class BlobsDamaged(StorageError):
    """Every blob one pass over a view found missing or wrong (see ``BlobDamaged``)."""

    retryable = True

    def __init__(self, damaged: Sequence[BlobDamaged]) -> None:
        super().__init__(
            f"{len(damaged)} blob(s) missing or damaged in the blob store (first: {damaged[0]})"
        )
        self.damaged = tuple(damaged)


# Called for a file whose blob did not show its recorded size and token when it was
# linked (the ``ObjectInfo`` of what was linked) or could not be linked (None): the
# damage found, or None when the blob is right after all (re-hashed, new token recorded).
BlobCheck = Callable[[ViewFile, ObjectInfo | None], BlobDamaged | None]
