"""The one exception tree of datasync.

Every error a user or operator can see is a ``DatasyncError``. SDK and OS errors are
translated at the backend boundary (one context manager per backend) and chained with
``from``. Each class says whether retrying can help (invariant 7)::

    DatasyncError
    ├── UserError                      permanent: bad input, nothing was changed
    │   ├── InvalidPath                 "..", absolute, control chars, NFC twins, ...
    │   ├── InvalidManifest             schema, digest format, sizes, duplicates
    │   ├── UnsupportedFileType         sockets, FIFOs, devices, escaping symlinks
    │   ├── UnknownReference            DATASET@REF that resolves to nothing (or to many)
    │   └── ConfigError                 bad datasync.toml / environment
    └── StorageError                    raised by backends; carries the URL, never secrets
        ├── NotFound                    permanent
        ├── PermissionDenied            permanent (also bad credentials)
        ├── NoSpace                     retryable between a task's attempts only, with a long
        │                               backoff and its own budget (ENOSPC, EDQUOT): a full
        │                               file system is a pause, not a failure
        ├── Conflict                    permanent: the key is occupied by something datasync
        │                               did not make, or a file/directory clash
        ├── SourceChanged               permanent for this attempt: ETag/generation moved
        ├── ChecksumMismatch            bytes differ from the manifest digest
        ├── Unsupported                 capability missing on this backend/endpoint
        ├── Throttled                   retryable; honours ``retry_after`` seconds
        └── TransientError              retryable: timeouts, resets, 5xx
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "Conflict",
    "DatasyncError",
    "InvalidManifest",
    "InvalidPath",
    "NoSpace",
    "NotFound",
    "PermissionDenied",
    "SourceChanged",
    "StorageError",
    "Throttled",
    "TransientError",
    "UnknownReference",
    "Unsupported",
    "UnsupportedFileType",
    "UserError",
]


class DatasyncError(Exception):
    """Base of every datasync error. ``retryable`` tells callers whether to try again."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(DatasyncError):
    """Bad input. Raised before any state changes."""


class InvalidPath(UserError):
    pass


class InvalidManifest(UserError):
    pass


class UnsupportedFileType(UserError):
    pass


class UnknownReference(UserError):
    pass


class ConfigError(UserError):
    pass


class StorageError(DatasyncError):
    """A backend operation failed. ``url`` names the object (credentials are never included)."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(f"{message} ({url})" if url else message)
        self.url = url


class NotFound(StorageError):
    pass


class PermissionDenied(StorageError):
    pass


class NoSpace(StorageError):
    """The destination is full. Space comes back when someone frees it, not within
    seconds: the retry policy never retries it within a call, and between a task's
    attempts waits long (``RetryPolicy.space_backoff``) within its own budget."""

    retryable = True


class Conflict(StorageError):
    """A key is taken by something else: a file where a directory is needed (or the
    reverse), a non-empty directory, or an object datasync did not create."""


class SourceChanged(StorageError):
    pass


class ChecksumMismatch(StorageError):
    pass


class Unsupported(StorageError):
    pass


class Throttled(StorageError):
    retryable = True

    def __init__(
        self, message: str, *, url: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, url=url)
        self.retry_after = retry_after


class TransientError(StorageError):
    retryable = True
