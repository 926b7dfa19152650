"""S3 and S3-compatible object stores through boto3.

URL ``s3://bucket/prefix``. Options (``[sites.NAME] options``): ``endpoint_url``,
``region_name``, ``profile``, ``aws_access_key_id`` / ``aws_secret_access_key`` /
``aws_session_token``; what a site does not give comes from boto3's own chain
(``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE`` and the shared files, SSO, web identity, the
container and instance roles; ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
``AWS_REGION``/``AWS_DEFAULT_REGION``). ``addressing_style`` (``auto``/``path``/``virtual``),
``page_size`` (list page, default 1000), ``checksum`` (``auto``/``crc32c``/``none``),
``max_pool_connections`` (default 64), ``connect_timeout`` (5 s), ``read_timeout`` (the
10 s floor) and ``min_rate_bytes`` (1 MiB/s; ``cloudcommon.Timeouts``),
``multipart_copy_threshold`` and ``copy_part_size`` (bytes; server-side copy switches to
UploadPartCopy above the threshold, 5 GiB by default: the CopyObject limit).

Invariants:

* No I/O at construction: the client is created on first use, once, under a lock. boto3
  clients are thread-safe; the connection pool is sized for the worker's thread count.
* botocore's own retries are off (one attempt): ``RetryingBackend`` owns retrying,
  so it must see every ``SlowDown`` to pace the site.
* Each call's read timeout is sized to its bytes (``Timeouts.read``), set per request
  through botocore's request context (``before-call`` hook, botocore >= 1.43.72); the
  client's own read timeout is the floor, which listings and HEADs use.
* A ranged read's body goes straight into the caller's buffer (``httpbody``), never
  through ``StreamingBody.read()``'s joined blocks; an answer longer than the range is an
  error, not bytes from another offset.
* Writer: an object that fits in one part is buffered and sent as one ``PutObject`` at
  commit (one request; nothing durable before). Larger ones are a multipart upload whose
  upload id is the resume token; part ``i`` is ``PartNumber i+1``; ``ListParts`` answers
  ``durable_parts`` and supplies the ETags for ``CompleteMultipartUpload``.
* Every part and single PutObject carries Content-MD5 (S3 refuses a mismatch with
  ``BadDigest``); a commit is ``verified`` (``base.py``, "Verified writes") when the store's
  ETags are the MD5s we computed, or it echoed our CRC32Cs, for every part and the object.
* Per-part CRC32C (``x-amz-checksum-crc32c``) is sent and verified by the server. With
  ``checksum="auto"`` an endpoint that rejects checksum headers (older S3-compatible
  stores) is remembered for the process and served without them; ``"crc32c"`` makes that
  an ``Unsupported`` error instead.
* Every SDK error passes through ``s3_errors``/``translate`` (one place, in
  ``s3_errors.py``); messages name the object URL, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, Self
from urllib.parse import SplitResult

from datasync.backends.base import Capabilities, ObjectInfo, PartLayout, check_key, join_url
from datasync.backends.cloudcommon import (
    CONNECT_TIMEOUT,
    MIN_RATE_BYTES,
    READ_TIMEOUT,
    TIMEOUT_OPTIONS,
    SingleRequestWriter,
    Timeouts,
    check_options,
    check_pin,
    host_port,
    join_key,
    opt_int,
    opt_str,
    relative_key,
    root_prefix,
    single_writer,
)
from datasync.backends.httpbody import read_body_into, read_range_by_into
from datasync.backends.s3_errors import error_code, rejects_checksum, s3_errors, translate
from datasync.errors import ConfigError, NotFound, StorageError, Unsupported

__all__ = ["S3Backend", "s3_errors", "translate"]

MiB = 1024 * 1024
GiB = 1024 * MiB

# Options passed straight through to the constructor as strings.
_STR_OPTIONS = (
    "endpoint_url",
    "region_name",
    "profile",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "addressing_style",
)
_OPTIONS = (
    frozenset(_STR_OPTIONS)
    | TIMEOUT_OPTIONS
    | {"page_size", "checksum", "max_pool_connections"}
    | {"multipart_copy_threshold", "copy_part_size"}
)
# The read timeout of the call this thread is making (None: the client's floor).
_READ_TIMEOUT: ContextVar[float | None] = ContextVar("datasync_s3_read_timeout", default=None)

# Endpoints (None = AWS) known to reject checksum headers, learned at run time.
_NO_CHECKSUM_ENDPOINTS: set[str | None] = set()
_NO_CHECKSUM_LOCK = threading.Lock()


def _crc32c_b64(data: bytes | memoryview) -> str:
    from awscrt import checksums  # type: ignore[import-untyped]  # releases the GIL, takes views

    return base64.b64encode(checksums.crc32c(data).to_bytes(4, "big")).decode("ascii")


def _md5(data: bytes | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()  # releases the GIL on big data


def _echoed(response: Mapping[str, Any], md5: bytes, crc: str | None) -> bool:
    """Did the store show it received exactly our bytes? Its ETag is the MD5 it computed
    (plain objects), or it echoed the CRC32C it checked (AWS); an ETag that is no MD5
    (SSE-KMS) with no echo proves nothing, which is not an error."""
    if crc is not None and response.get("ChecksumCRC32C") == crc:
        return True
    return _strip_etag(response.get("ETag")) == md5.hex()


def _sized_read_timeout(context: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` hook: this request's read timeout, sized to its bytes."""
    value = _READ_TIMEOUT.get()
    if value is not None:
        context["read_timeout"] = value


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else etag


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') or etag == "*" else f'"{etag}"'


class S3Backend:
    """A bucket (and optional prefix) on S3 or an S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        addressing_style: str | None = None,
        page_size: int = 1000,
        checksum: str = "auto",
        max_pool_connections: int = 64,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        min_rate_bytes: float = MIN_RATE_BYTES,
        multipart_copy_threshold: int = 5 * GiB,
        copy_part_size: int = 512 * MiB,
    ) -> None:
        if len(bucket) < 3:
            raise ConfigError(f"S3 bucket name {bucket!r} is too short (3 characters minimum)")
        if checksum not in ("auto", "crc32c", "none"):
            raise ConfigError(f"checksum must be auto, crc32c or none, not {checksum!r}")
        if addressing_style not in (None, "auto", "path", "virtual"):
            raise ConfigError(f"addressing_style must be auto, path or virtual: {addressing_style}")
        self.bucket = bucket
        self.prefix = root_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.checksum = checksum
        self.multipart_copy_threshold = multipart_copy_threshold
        self.copy_part_size = copy_part_size
        self.timeouts = Timeouts(connect_timeout, read_timeout, min_rate_bytes)
        self._endpoint = host_port(endpoint_url)
        self._session_args = {
            "profile_name": profile,
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
            "region_name": region_name,
        }
        self._config_args: dict[str, Any] = {
            "max_pool_connections": max_pool_connections,
            "connect_timeout": self.timeouts.connect,
            "read_timeout": self.timeouts.read_floor,
            "retries": {"mode": "standard", "total_max_attempts": 1},
            # We send checksums ourselves; SDK-default trailers break S3-compatible stores.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": addressing_style or "auto"},
        }
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._bucket_seen = False

    @classmethod
    def from_url(cls, parsed: SplitResult, options: Mapping[str, Any]) -> Self:
        url = f"s3://{parsed.netloc}{parsed.path}"
        check_options(options, _OPTIONS, url)
        if not parsed.netloc:
            raise ConfigError(f"{url}: missing bucket name (s3://bucket/prefix)")
        strs = {name: opt_str(options, name) for name in _STR_OPTIONS}
        timeouts = Timeouts.from_options(options)
        return cls(
            parsed.netloc,
            parsed.path,
            **strs,
            page_size=opt_int(options, "page_size", 1000),
            checksum=opt_str(options, "checksum") or "auto",
            max_pool_connections=opt_int(options, "max_pool_connections", 64),
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read_floor,
            min_rate_bytes=timeouts.min_rate,
            multipart_copy_threshold=opt_int(options, "multipart_copy_threshold", 5 * GiB),
            copy_part_size=opt_int(options, "copy_part_size", 512 * MiB, minimum=5 * MiB),
        )

    # -- plumbing ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _url(self, key: str) -> str:
        return join_url(self.url, key)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _errors(self, url: str) -> AbstractContextManager[None]:
        return s3_errors(url, endpoint=lambda: self._endpoint)

    @contextmanager
    def _sized(self, nbytes: int) -> Iterator[None]:
        """The calls inside get a read timeout sized to ``nbytes`` (``Timeouts.read``)."""
        token = _READ_TIMEOUT.set(self.timeouts.read(nbytes))
        try:
            yield
        finally:
            _READ_TIMEOUT.reset(token)

    def prepare(self) -> None:
        _ = self.client  # builds it (no request)

    @property
    def endpoint(self) -> str | None:
        """``host:port`` the client talks to (the option, else what boto3 resolved from the
        environment or the region); builds the client, which makes no request."""
        if self._endpoint is None:
            _ = self.client
        return self._endpoint

    @property
    def client(self) -> Any:
        """The boto3 client, created on first use (reads credentials, no network I/O)."""
        if self._client is None:
            with self._client_lock, self._errors(self.url):
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    session = boto3.session.Session(**self._session_args)
                    client = session.client(
                        "s3", endpoint_url=self.endpoint_url, config=Config(**self._config_args)
                    )
                    client.meta.events.register("before-call.s3", _sized_read_timeout)
                    self._endpoint = host_port(client.meta.endpoint_url)
                    self._client = client
        return self._client

    def use_checksums(self) -> bool:
        """Whether parts are sent with CRC32C for this endpoint (may turn False at run time)."""
        if self.checksum == "none":
            return False
        with _NO_CHECKSUM_LOCK:
            return self.endpoint_url not in _NO_CHECKSUM_ENDPOINTS

    def _checksum_rejected(self, exc: BaseException, url: str) -> None:
        """Remember that this endpoint refuses checksums, or fail if they are required."""
        if self.checksum == "crc32c":
            raise Unsupported(
                "endpoint rejects x-amz-checksum-crc32c (set checksum='auto' or 'none')", url=url
            ) from exc
        with _NO_CHECKSUM_LOCK:
            _NO_CHECKSUM_ENDPOINTS.add(self.endpoint_url)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            server_side_copy=True,
            native_checksums=("crc32c",) if self.use_checksums() else (),
            conditional_read=True,
            lists_parts=True,
            min_part_size=5 * MiB,
            max_part_size=5 * GiB,
            max_parts=10_000,
            verified_writes=True,
        )

    def _missing(self, exc: NotFound, url: str) -> StorageError:
        """A 404 on HEAD has no body: say whether it is the bucket that is missing."""
        if not self._bucket_seen:
            try:
                with self._errors(url):
                    self.client.head_bucket(Bucket=self.bucket)
                self._bucket_seen = True
            except NotFound:
                return NotFound(f"bucket missing: s3://{self.bucket} does not exist", url=url)
        return exc

    # -- reading ----------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        url = self._url(key)
        try:
            with self._errors(url):
                head = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except NotFound as exc:
            raise self._missing(exc, url) from exc
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            etag=_strip_etag(head.get("ETag")),
            mtime=head["LastModified"].timestamp() if head.get("LastModified") else None,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._errors(self._url(prefix)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=join_key(self.prefix, prefix),
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(
                        key=relative_key(self.prefix, obj["Key"]),
                        size=int(obj["Size"]),
                        etag=_strip_etag(obj.get("ETag")),
                        mtime=obj["LastModified"].timestamp() if obj.get("LastModified") else None,
                    )

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        return read_range_by_into(self, key, offset, length, etag)

    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int:
        """One ranged GetObject whose body is read straight into ``buf`` (``httpbody``):
        ``StreamingBody.read()`` joins the body in blocks and the caller copied it again
        into its pooled buffer, two passes over every byte under the GIL."""
        view = memoryview(buf).cast("B")
        length = len(view)
        if offset < 0:
            raise ValueError(f"bad range offset={offset}")
        url = self._url(key)
        if length == 0:
            self._check_pin(key, etag)
            return 0
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "Range": f"bytes={offset}-{offset + length - 1}",
        }
        if etag:
            args["IfMatch"] = _quote_etag(etag)
        try:
            with self._errors(url), self._sized(length):
                try:
                    response = self.client.get_object(**args)
                except Exception as exc:
                    if error_code(exc)[0] == "InvalidRange":  # offset >= size
                        info = self._check_pin(key, etag)
                        if offset >= info.size:
                            return 0
                    raise
                body = response["Body"]
                size = int(response.get("ContentLength", length))
                if size > length:  # the range was not honoured: never read past it
                    body.close()
                    raise StorageError(f"asked for {length} bytes, got {size}", url=url)
                # The urllib3 response under botocore's StreamingBody (its private name).
                raw = getattr(body, "_raw_stream", None)
                if raw is None:  # pragma: no cover - a botocore without it: one copy
                    data = body.read()
                    view[: len(data)] = data
                    return len(data)
                return read_body_into(raw, view[:size])
        except NotFound as exc:
            raise self._missing(exc, url) from exc

    def _check_pin(self, key: str, etag: str | None) -> ObjectInfo:
        return check_pin(self.stat(key), _strip_etag(etag), self._url(key))

    # -- writing ----------------------------------------------------------------------

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> SingleRequestWriter | _S3MultipartWriter:
        check_key(key)
        layout = PartLayout(size, part_size)
        single = single_writer(key, layout, token, self.put_object)
        if single is not None:
            return single
        n = layout.count
        caps = self.capabilities
        if n > caps.max_parts or part_size > caps.max_part_size or part_size < caps.min_part_size:
            raise Unsupported(
                f"S3 multipart needs 5 MiB <= part_size <= 5 GiB and <= 10,000 parts "
                f"(size {size}, part_size {part_size})",
                url=self._url(key),
            )
        if token is not None:
            writer = _S3MultipartWriter(self, key, layout, token, checksum=None)
            writer.uses_checksum()  # NotFound now if the upload was aborted or completed
            return writer
        return self._create_multipart(key, layout)

    def _create_multipart(self, key: str, layout: PartLayout) -> _S3MultipartWriter:
        url = self._url(key)
        with self._errors(url):
            if self.use_checksums():
                try:
                    upload = self.client.create_multipart_upload(
                        Bucket=self.bucket, Key=self._name(key), ChecksumAlgorithm="CRC32C"
                    )
                    return _S3MultipartWriter(self, key, layout, upload["UploadId"], checksum=True)
                except Exception as exc:
                    if not rejects_checksum(exc):
                        raise
                    self._checksum_rejected(exc, url)
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._name(key))
            return _S3MultipartWriter(self, key, layout, upload["UploadId"], checksum=False)

    def put_object(self, key: str, data: bytes) -> ObjectInfo:
        """One-request upload (used by small writers), with CRC32C where accepted."""
        url = self._url(key)
        md5 = _md5(data)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "Body": data,
            "ContentMD5": base64.b64encode(md5).decode("ascii"),  # S3 checks it: BadDigest
        }
        crc: str | None = None
        with self._errors(url), self._sized(len(data)):
            response = None
            if self.use_checksums():
                try:
                    crc = _crc32c_b64(data)
                    response = self.client.put_object(**args, ChecksumCRC32C=crc)
                except Exception as exc:
                    if not rejects_checksum(exc):
                        raise
                    self._checksum_rejected(exc, url)
            if response is None:
                crc = None
                response = self.client.put_object(**args)
        # PutObject answers no Last-Modified; a HEAD per small object would double requests.
        return ObjectInfo(
            key=key,
            size=len(data),
            etag=_strip_etag(response.get("ETag")),
            verified=_echoed(response, md5, crc),
        )

    def delete(self, key: str) -> None:
        with self._errors(self._url(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        src = source if source is not None and source.etag else self.stat(src_key)
        url = self._url(dst_key)
        copy_source = {"Bucket": self.bucket, "Key": self._name(src_key)}
        pin = _quote_etag(src.etag) if src.etag else None
        pin_args = {"CopySourceIfMatch": pin} if pin else {}
        if src.size <= self.multipart_copy_threshold:
            with self._errors(url), self._sized(src.size):
                result = self.client.copy_object(
                    Bucket=self.bucket, Key=self._name(dst_key), CopySource=copy_source, **pin_args
                )["CopyObjectResult"]
            etag = _strip_etag(result.get("ETag"))
            if etag != src.etag:
                # Not provably a copy of the version pinned (SSE-KMS and multipart sources
                # get ETags of their own; an endpoint may ignore CopySourceIfMatch, as moto
                # does): the copy's size is the copy's to say, not the pin's.
                return self.stat(dst_key)
            mtime = result["LastModified"].timestamp() if result.get("LastModified") else None
            return ObjectInfo(dst_key, src.size, etag, mtime)
        return self._copy_multipart(copy_source, src, dst_key, pin_args)

    def _copy_multipart(
        self, source: dict[str, str], src: ObjectInfo, dst_key: str, pin_args: dict[str, str]
    ) -> ObjectInfo:
        """UploadPartCopy for objects above the CopyObject limit (5 GiB on AWS)."""
        url = self._url(dst_key)
        layout = PartLayout(src.size, max(self.copy_part_size, -(-src.size // 10_000)))
        with self._errors(url):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self._name(dst_key)
            )["UploadId"]
            try:
                parts = []
                for index in range(layout.count):
                    start = layout.offset(index)
                    end = start + layout.length(index) - 1
                    with self._sized(layout.length(index)):
                        result = self.client.upload_part_copy(
                            Bucket=self.bucket,
                            Key=self._name(dst_key),
                            UploadId=upload_id,
                            PartNumber=index + 1,
                            CopySource=source,
                            CopySourceRange=f"bytes={start}-{end}",
                            **pin_args,
                        )
                    parts.append(
                        {"PartNumber": index + 1, "ETag": result["CopyPartResult"]["ETag"]}
                    )
                with self._sized(src.size):
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=self._name(dst_key),
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    )
            except BaseException:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._name(dst_key), UploadId=upload_id
                )
                raise
        return self.stat(dst_key)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _S3MultipartWriter:
    """A multipart upload; the upload id is the resume token."""

    def __init__(
        self,
        backend: S3Backend,
        key: str,
        layout: PartLayout,
        upload_id: str,
        *,
        checksum: bool | None,
    ) -> None:
        self._b = backend
        self._key = key
        self._name = backend._name(key)
        self._url = backend._url(key)
        self._layout = layout
        self._upload_id = upload_id
        # None: resumed upload, learn from ListParts whether it was created with CRC32C.
        self._checksum = checksum
        self._lock = threading.Lock()
        self._sent: list[dict[str, Any]] | None = None  # parts of the last Complete request
        # Part index -> (MD5, CRC32C sent or None, the store showed it got those bytes).
        self._proof: dict[int, tuple[bytes, str | None, bool]] = {}

    @property
    def token(self) -> str:
        return self._upload_id

    def uses_checksum(self) -> bool:
        with self._lock:
            if self._checksum is not None:
                return self._checksum
        with self._b._errors(self._url):
            page = self._b.client.list_parts(
                Bucket=self._b.bucket, Key=self._name, UploadId=self._upload_id, MaxParts=1
            )
        with self._lock:
            created_with = page.get("ChecksumAlgorithm") or any(
                part.get("ChecksumCRC32C") for part in page.get("Parts", ())
            )
            self._checksum = bool(created_with) and self._b.use_checksums()
            return self._checksum

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        self._layout.check(index, len(data))
        body = bytes(data) if isinstance(data, memoryview) else data  # botocore wants bytes
        md5 = _md5(body)
        args: dict[str, Any] = {
            "Bucket": self._b.bucket,
            "Key": self._name,
            "UploadId": self._upload_id,
            "PartNumber": index + 1,
            "Body": body,
            "ContentLength": len(body),
            "ContentMD5": base64.b64encode(md5).decode("ascii"),
        }
        with self._b._errors(self._url), self._b._sized(len(body)):
            response = None
            crc: str | None = None
            if self.uses_checksum():
                try:
                    crc = _crc32c_b64(body)
                    response = self._b.client.upload_part(**args, ChecksumCRC32C=crc)
                except Exception as exc:
                    if not rejects_checksum(exc):
                        raise
                    self._b._checksum_rejected(exc, self._url)
                    with self._lock:
                        self._checksum = False
            if response is None:
                crc = None
                response = self._b.client.upload_part(**args)
        with self._lock:
            self._proof[index] = (md5, crc, _echoed(response, md5, crc))

    def part_proof(self, index: int) -> str | None:
        """``MD5hex:CRC32C`` of a part the store showed it got (ETag or echoed checksum)."""
        with self._lock:
            proof = self._proof.get(index)
        if proof is None or not proof[2]:
            return None
        return f"{proof[0].hex()}:{proof[1] or ''}"

    def accept_part_proofs(self, proofs: Mapping[int, str]) -> None:
        with self._lock:
            for index, text in proofs.items():
                md5_hex, sep, crc = text.partition(":")
                try:
                    md5 = bytes.fromhex(md5_hex)
                    crc_ok = not crc or len(base64.b64decode(crc, validate=True)) == 4
                except ValueError:  # binascii.Error is one
                    continue
                if sep and len(md5) == 16 and crc_ok:
                    self._proof.setdefault(index, (md5, crc or None, True))

    def _parts(self) -> dict[int, dict[str, Any]]:
        """Parts the store holds with the expected length, by 0-based index."""
        found: dict[int, dict[str, Any]] = {}
        n = self._layout.count
        with self._b._errors(self._url):
            pages = self._b.client.get_paginator("list_parts").paginate(
                Bucket=self._b.bucket, Key=self._name, UploadId=self._upload_id
            )
            for page in pages:
                for part in page.get("Parts", ()):
                    index = int(part["PartNumber"]) - 1
                    if 0 <= index < n and part["Size"] == self._layout.length(index):
                        found[index] = part
        return found

    def durable_parts(self) -> set[int]:
        return set(self._parts())

    def commit(self) -> ObjectInfo:
        """CompleteMultipartUpload. Called again after a lost answer, the upload is gone
        (``NoSuchUpload``): the object at the key is ours if its ETag is the multipart ETag
        of the parts we sent (md5 of their md5s, ``-N``), and that counts as committed."""
        try:
            parts = self._parts()
        except NotFound:
            done = self._already_committed()
            if done is None:
                raise
            return done
        n = self._layout.count
        missing = sorted(set(range(n)) - set(parts))
        if missing:
            raise StorageError(
                f"cannot commit: {len(missing)} of {n} parts missing (first: {missing[0]})",
                url=self._url,
            )
        listed = []
        for index in range(n):
            entry = {"PartNumber": index + 1, "ETag": parts[index]["ETag"]}
            if parts[index].get("ChecksumCRC32C"):
                entry["ChecksumCRC32C"] = parts[index]["ChecksumCRC32C"]
            listed.append(entry)
        self._sent = listed
        with self._b._errors(self._url), self._b._sized(self._layout.size):
            done = self._b.client.complete_multipart_upload(
                Bucket=self._b.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": listed},
            )
        return ObjectInfo(
            key=self._key,
            size=self._layout.size,
            etag=_strip_etag(done.get("ETag")),
            verified=self._proved(done),
        )

    def _proved(self, done: Mapping[str, Any]) -> bool:
        """Every part was sent by this writer and the store showed it got those bytes, and
        the completed object is made of exactly them: its ETag is the MD5 of our part MD5s
        (``-N``), or its composite CRC32C is the CRC32C of our part CRC32Cs."""
        n = self._layout.count
        with self._lock:
            proof = [self._proof.get(i) for i in range(n)]
        if any(p is None or not p[2] for p in proof):
            return False
        parts = [p for p in proof if p is not None]
        md5s = b"".join(p[0] for p in parts)
        if _strip_etag(done.get("ETag")) == f"{_md5(md5s).hex()}-{n}":
            return True
        crcs = [p[1] for p in parts]
        if all(crcs):
            joined = b"".join(base64.b64decode(str(c)) for c in crcs)
            return done.get("ChecksumCRC32C") == f"{_crc32c_b64(joined)}-{n}"
        return False

    def _already_committed(self) -> ObjectInfo | None:
        """The object this writer completed earlier (its answer lost), or None."""
        if self._sent is None:
            return None
        digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in self._sent)
        expected = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(self._sent)}"
        try:
            info = self._b.stat(self._key)
        except NotFound:
            return None
        if info.etag != expected or info.size != self._layout.size:
            return None
        return info

    def abort(self) -> None:
        try:
            with self._b._errors(self._url):
                self._b.client.abort_multipart_upload(
                    Bucket=self._b.bucket, Key=self._name, UploadId=self._upload_id
                )
        except NotFound:
            pass  # already aborted or completed: abort is idempotent

    def close(self) -> None:
        """Nothing local to release (the upload state lives in the store)."""
