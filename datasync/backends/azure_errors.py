"""Azure error translation: the one place azure-core/azure-identity errors become
``StorageError``s.

``classify`` maps an HTTP status and ``x-ms-error-code`` (also used for raw responses);
``translate`` maps an SDK exception and is unit-tested on real SDK exception objects;
``azure_errors`` is the context manager every Azure call runs in. Messages carry the URL
and the error code, never account keys, SAS tokens or connection strings; a network error
names the endpoint (``host:port``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

__all__ = ["azure_errors", "classify", "error_code", "translate"]

_DENIED = {
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "AuthorizationResourceTypeMismatch",
    "InsufficientAccountPermissions",
    "AccountIsDisabled",
}
_THROTTLED = {"ServerBusy", "OperationTimedOut", "TooManyRequests"}
_CHECKSUM = {"Md5Mismatch", "Crc64Mismatch", "InvalidMd5", "InvalidCrc64"}


def error_code(exc: BaseException) -> str:
    """The ``x-ms-error-code`` of an SDK exception ("" when it has none)."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def classify(status: int, code: str, headers: Mapping[str, str], url: str) -> StorageError:
    """The ``StorageError`` for an HTTP status and ``x-ms-error-code``."""
    text = code or str(status)
    if code == "ContainerNotFound":
        return NotFound("container missing", url=url)
    if status == 404:
        return NotFound(f"object not found ({text})", url=url)
    if code == "ConditionNotMet" or status == 412:
        return SourceChanged(f"object changed since it was pinned ({text})", url=url)
    if code in _DENIED or status in (401, 403):
        return PermissionDenied(f"access denied ({text})", url=url)
    if code in _THROTTLED or status in (429, 503):
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return Throttled(f"throttled ({text})", url=url, retry_after=retry_after)
    if code in _CHECKSUM:
        return ChecksumMismatch(f"the service rejected the block checksum ({text})", url=url)
    if status >= 500:
        return TransientError(f"server error ({text})", url=url)
    return StorageError(f"Azure request failed ({text})", url=url)


def translate(exc: BaseException, url: str, endpoint: str | None = None) -> StorageError | None:
    """The ``StorageError`` for an azure-core/azure-identity exception, or None.
    ``endpoint`` (``host:port``) is named in network errors."""
    from azure.core import exceptions as aex
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(
        exc,
        aex.ServiceRequestError
        | aex.ServiceResponseError
        | aex.IncompleteReadError
        | Urllib3Error
        | ConnectionError
        | TimeoutError,
    ):
        return network_error(exc, url, endpoint)
    if not isinstance(exc, aex.AzureError):
        return None
    response = getattr(exc, "response", None)
    status = int(getattr(exc, "status_code", None) or getattr(response, "status_code", 0) or 0)
    if not status:  # errors raised before or without a response
        if isinstance(exc, aex.ClientAuthenticationError):
            status = 401  # e.g. no credential in DefaultAzureCredential's chain
        elif isinstance(exc, aex.ResourceNotFoundError):
            status = 404
        elif isinstance(exc, aex.ResourceModifiedError):
            status = 412
    headers = getattr(response, "headers", None) or {}
    return classify(status, error_code(exc) or type(exc).__name__, headers, url)


def azure_errors(
    url: str, *, endpoint: Callable[[], str | None] | None = None
) -> AbstractContextManager[None]:
    """The one place Azure SDK errors become ``StorageError``s (chained with ``from``)."""
    return translated(translate, url, endpoint)
