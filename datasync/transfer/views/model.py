"""Values shared by the view builders."""

from __future__ import annotations

from dataclasses import dataclass

from datasync.errors import StorageError

__all__ = ["BlobDamaged", "PublishResult", "ViewFile"]


@dataclass(frozen=True, slots=True)
class ViewFile:
    """One file of a view: its path in the version and its blob-store key at the site."""

    path: str
    digest: str
    size: int
    key: str


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
