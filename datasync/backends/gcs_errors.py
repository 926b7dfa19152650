"""GCS error translation: the one place google-cloud-storage, google-auth, requests and
urllib3 errors become ``StorageError``s.

``translate`` maps an exception (unit-tested on real library exception objects),
``by_status`` a bare HTTP status (``read_range`` reads responses itself), and
``gcs_errors`` is the context manager every GCS call runs in. A network error names the
endpoint (``host:port``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from datasync.backends.cloudcommon import network_error, parse_retry_after, translated
from datasync.errors import (
    ChecksumMismatch,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    Throttled,
    TransientError,
)

__all__ = ["by_status", "gcs_errors", "translate"]


def translate(exc: BaseException, url: str, endpoint: str | None = None) -> StorageError | None:
    """The ``StorageError`` for a google-cloud-storage / google-auth / requests error.
    ``endpoint`` (``host:port``) is named in network errors."""
    import requests
    from google.api_core import exceptions as gex
    from google.auth import exceptions as auth_ex
    from google.cloud.storage import exceptions as sex
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, gex.GoogleAPICallError):
        status = int(exc.code or 0)
        text = f"{status} {type(exc).__name__}"
        if isinstance(exc, gex.NotFound):
            return NotFound(f"not found ({text})", url=url)
        if isinstance(exc, gex.PreconditionFailed):
            return SourceChanged(f"object changed since it was pinned ({text})", url=url)
        if isinstance(exc, gex.Forbidden | gex.Unauthorized):
            return PermissionDenied(f"access denied ({text})", url=url)
        if isinstance(exc, gex.TooManyRequests | gex.ServiceUnavailable):
            response = getattr(exc, "response", None)
            headers = getattr(response, "headers", None) or {}
            return Throttled(
                f"throttled ({text})",
                url=url,
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        if status >= 500 or isinstance(exc, gex.RequestRangeNotSatisfiable):
            return TransientError(f"server error ({text})", url=url)
        return StorageError(f"GCS request failed ({text}: {exc.message})", url=url)
    if isinstance(exc, sex.DataCorruption):
        return ChecksumMismatch(f"CRC32C mismatch between client and server: {exc}", url=url)
    if isinstance(exc, sex.InvalidResponse):
        status = int(getattr(exc.response, "status_code", 0) or 0)
        return by_status(status, url)
    if isinstance(exc, auth_ex.RefreshError):
        if getattr(exc, "retryable", False):
            return TransientError("token refresh failed (retryable)", url=url)
        return PermissionDenied("credentials rejected by the token endpoint", url=url)
    if isinstance(exc, auth_ex.DefaultCredentialsError):
        return PermissionDenied("no Google credentials found (set credentials_file)", url=url)
    if isinstance(exc, auth_ex.TransportError | requests.ConnectionError | requests.Timeout):
        return network_error(exc, url, endpoint)
    # read_range reads the raw urllib3 response, whose errors (a body cut short) requests
    # never wraps.
    if isinstance(exc, requests.RequestException | Urllib3Error | ConnectionError | TimeoutError):
        return network_error(exc, url, endpoint)
    return None


def by_status(status: int, url: str) -> StorageError:
    """The ``StorageError`` for a bare HTTP status (responses read without the library)."""
    if status == 404:
        return NotFound(f"not found ({status})", url=url)
    if status == 412:
        return SourceChanged(f"object changed since it was pinned ({status})", url=url)
    if status in (401, 403):
        return PermissionDenied(f"access denied ({status})", url=url)
    if status in (429, 503):
        return Throttled(f"throttled ({status})", url=url)
    if status >= 500:
        return TransientError(f"server error ({status})", url=url)
    return StorageError(f"GCS request failed ({status})", url=url)


def gcs_errors(
    url: str, *, endpoint: Callable[[], str | None] | None = None
) -> AbstractContextManager[None]:
    """The one place GCS SDK errors become ``StorageError``s (chained with ``from``)."""
    return translated(translate, url, endpoint)
