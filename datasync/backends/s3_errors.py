"""S3 error translation: the one place boto3/botocore errors become ``StorageError``s.

``translate`` is a pure function of the exception (unit-tested on real botocore exception
objects); ``s3_errors`` is the context manager every S3 call runs in. Messages carry the
object URL and the service's error code and message, never credentials; a network error
names the endpoint (``host:port``) it could not reach or that did not answer.
``rejects_checksum`` recognises S3-compatible stores that refuse ``x-amz-checksum-*``
headers (as opposed to a bad digest), which ``s3.py`` then remembers per endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from datasync.backends.cloudcommon import host_port, network_error, parse_retry_after, translated
from datasync.errors import (
    ChecksumMismatch,
    NotFound,
    PermissionDenied,
    SourceChanged,
    StorageError,
    Throttled,
    TransientError,
    Unsupported,
)

__all__ = ["error_code", "rejects_checksum", "s3_errors", "translate"]

_NOT_FOUND = {"NoSuchKey", "NoSuchUpload", "NotFound", "404", "NoSuchVersion"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "401",
}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
    "ServiceUnavailable",
    "503",
    "429",
}
_CHECKSUM_BAD = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"}
_TRANSIENT = {"InternalError", "RequestTimeout", "RequestTimeTooSkewed", "OperationAborted"}
_PRECONDITION = {"PreconditionFailed", "412"}
# What S3-compatible stores answer when they do not understand x-amz-checksum-* headers.
_CHECKSUM_UNSUPPORTED_CODES = {
    "NotImplemented",
    "InvalidArgument",
    "InvalidRequest",
    "XAmzContentSHA256Mismatch",
    "MissingContentLength",
    "BadRequest",
}


def translate(exc: BaseException, url: str, endpoint: str | None = None) -> StorageError | None:
    """The ``StorageError`` for a boto3/botocore exception, or None if it is not one.

    ``endpoint`` (``host:port``) is named in network errors whose exception does not say
    which endpoint it was talking to."""
    from botocore import exceptions as bex

    kwargs = getattr(exc, "kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
        endpoint = host_port(str(kwargs["endpoint_url"])) or endpoint

    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code", "") or "")
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        text = f"{code or status}: {err.get('Message') or 'no message'}"
        op = getattr(exc, "operation_name", "request")
        if code == "NoSuchBucket":
            return NotFound(f"bucket missing: {op} failed with {text}", url=url)
        if code in _NOT_FOUND or status == 404:
            return NotFound(f"{op}: object not found ({text})", url=url)
        if code in _PRECONDITION or status == 412:
            return SourceChanged(f"{op}: object changed since it was pinned ({text})", url=url)
        if code in _DENIED or status in (401, 403):
            return PermissionDenied(f"{op}: access denied ({text})", url=url)
        if code in _THROTTLED or status in (429, 503):
            headers = meta.get("HTTPHeaders", {}) or {}
            return Throttled(
                f"{op}: throttled ({text})",
                url=url,
                retry_after=parse_retry_after(headers.get("retry-after")),
            )
        if code in _CHECKSUM_BAD or "checksum" in code.lower():
            return ChecksumMismatch(f"{op}: the store rejected the data checksum ({text})", url=url)
        if code in _TRANSIENT or status >= 500:
            return TransientError(f"{op}: server error ({text})", url=url)
        return StorageError(f"{op} failed: {text}", url=url)
    if isinstance(exc, bex.FlexibleChecksumError):
        return ChecksumMismatch(f"response checksum mismatch: {exc}", url=url)
    # IncompleteReadError: a body shorter than its Content-Length (a dropped connection).
    if isinstance(exc, bex.ConnectionError | bex.HTTPClientError | bex.IncompleteReadError):
        return network_error(exc, url, endpoint)
    if isinstance(
        exc,
        bex.NoCredentialsError
        | bex.PartialCredentialsError
        | bex.ProfileNotFound
        | bex.CredentialRetrievalError,
    ):
        return PermissionDenied(f"no usable AWS credentials: {type(exc).__name__}", url=url)
    if isinstance(exc, bex.MissingDependencyException):
        return Unsupported(f"missing SDK dependency: {exc}", url=url)
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"S3 client error: {type(exc).__name__}: {exc}", url=url)
    if isinstance(exc, ConnectionError | TimeoutError):
        return network_error(exc, url, endpoint)
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        return None
    if isinstance(exc, Urllib3Error):
        return network_error(exc, url, endpoint)
    return None


def s3_errors(
    url: str, *, endpoint: Callable[[], str | None] | None = None
) -> AbstractContextManager[None]:
    """The one place boto3/botocore errors become ``StorageError``s (chained with ``from``)."""
    return translated(translate, url, endpoint)


def error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str((response.get("Error") or {}).get("Code", "") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def rejects_checksum(exc: BaseException) -> bool:
    """True when an S3-compatible store refused our checksum headers (not a bad digest)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, status = error_code(exc)
    return code in _CHECKSUM_UNSUPPORTED_CODES or status == 501
