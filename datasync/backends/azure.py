"""Azure Blob Storage (block blobs) through azure-storage-blob.

URL ``az://account/container/prefix``. Options: ``connection_string`` (wins; Azurite uses
it), else ``account_url`` (default ``https://ACCOUNT.blob.core.windows.net``) with one of
``account_key``, ``sas_token``, or ``anonymous = true`` for public containers. A site that
gives none of them follows the SDK's and the Azure CLI's environment (``credential_source``):
``AZURE_STORAGE_CONNECTION_STRING`` (when it is for the URL's account and no
``account_url`` is set), ``AZURE_STORAGE_ACCOUNT_KEY``/``AZURE_STORAGE_KEY``, then
``AZURE_STORAGE_SAS_TOKEN`` (when ``AZURE_STORAGE_ACCOUNT[_NAME]`` is unset or names the
URL's account), then ``DefaultAzureCredential`` (``AZURE_CLIENT_ID``..., workload identity,
managed identity, Azure CLI ...). Also ``page_size`` (list page, default 5000),
``checksum`` (``md5``, the default: Content-MD5 on every block and Put Blob, checked by
the service, which lets a commit prove its content without a re-read; or ``none``),
``max_pool_connections``, ``connect_timeout``, ``read_timeout`` and ``min_rate_bytes``
(``cloudcommon.Timeouts``: each call's read timeout is sized to its bytes), and
``copy_timeout`` (seconds).

Invariants:

* No I/O at construction; the service client is built on first use. The SDK's retries are
  off (``retry_total=0``): ``RetryingBackend`` decides, seeing every ``ServerBusy``.
* Chunked writes stage one block per part and commit the block list. Block ids are
  ``f"{token}-{index:08d}"`` (the SDK base64-encodes them); ``token`` is 16 random hex
  characters per writer, so every id has the same length, ids are deterministic per part
  within an attempt, and two attempts never collide. ``durable_parts`` reads the
  uncommitted block list and keeps this token's blocks of the right size.
* ``abort`` commits nothing, so nothing becomes visible, and stages a one-byte tombstone
  block ``f"{token}-aborted."`` (same id length): resuming that token raises ``NotFound``.
  Staged blocks cannot be deleted on their own: the service drops uncommitted blocks after
  a week, or at the next commit of the blob. (Deleting a never-committed blob would race a
  concurrent commit, and re-committing the old list would change a live blob's ETag.)
* Objects that fit in one part are buffered and uploaded with one Put Blob at commit.
* With ``checksum="md5"`` a commit is ``verified`` (``base.py``, "Verified writes") when
  this writer staged every block itself, each with a Content-MD5 the service checked.
* Ranged reads use the SDK's generated Get Blob (same pipeline and signing) but read the
  body into the caller's buffer (``httpbody.py``) instead of joining 1 MiB blocks.
* Listing: Azurite orders names by UTF-16 code units; ``codepoint_order`` restores the
  protocol's code-point order.
* Errors go through ``azure_errors`` (one place, in ``azure_errors.py``); messages never
  carry keys or SAS tokens.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Self
from urllib.parse import SplitResult, urlsplit

from datasync.backends.azure_errors import azure_errors, error_code, translate
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
    codepoint_order,
    host_port,
    join_key,
    new_token,
    opt_bool,
    opt_int,
    opt_str,
    relative_key,
    root_prefix,
    single_writer,
)
from datasync.backends.httpbody import read_body_into, read_range_by_into
from datasync.errors import ConfigError, NotFound, StorageError, TransientError

__all__ = ["AzureBackend", "azure_errors", "credential_source", "translate"]

MiB = 1024 * 1024
_OPTIONS = TIMEOUT_OPTIONS | {
    "connection_string",
    "account_url",
    "account_key",
    "sas_token",
    "anonymous",
    "page_size",
    "checksum",
    "max_pool_connections",
    "copy_timeout",
}


def _connection_account(connection_string: str) -> str | None:
    """The account a connection string is for (``AccountName``, else its blob endpoint's
    first host label or, for emulators, its first path segment); None if it says not."""
    fields = {
        key.strip().lower(): value.strip()
        for key, _, value in (part.partition("=") for part in connection_string.split(";"))
    }
    if fields.get("accountname"):
        return fields["accountname"]
    endpoint = urlsplit(fields.get("blobendpoint", ""))
    host = endpoint.hostname or ""
    if host.endswith(".blob.core.windows.net"):
        return host.split(".", 1)[0]
    return endpoint.path.strip("/").split("/", 1)[0] or None


def credential_source(
    account: str, env: Mapping[str, str], *, connection_string: bool = True
) -> tuple[str, str | None]:
    """Where a site with no credential option gets one, from the environment: one of
    ``("connection_string", value)`` (unless ``connection_string`` is False: the site named
    its own endpoint), ``("account_key", value)``, ``("sas_token", value)`` or
    ``("default", None)`` (``DefaultAzureCredential``). Variables meant for another
    account than ``account`` are passed over."""
    connection = env.get("AZURE_STORAGE_CONNECTION_STRING") if connection_string else None
    if connection and _connection_account(connection) in (None, account):
        return "connection_string", connection
    named = env.get("AZURE_STORAGE_ACCOUNT_NAME") or env.get("AZURE_STORAGE_ACCOUNT")
    if named in (None, "", account):
        key = env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_KEY")
        if key:
            return "account_key", key
        sas = env.get("AZURE_STORAGE_SAS_TOKEN")
        if sas:
            return "sas_token", sas
    return "default", None


def block_id(token: str, index: int) -> str:
    """Deterministic, fixed-length block id of part ``index`` in attempt ``token``."""
    return f"{token}-{index:08d}"


def tombstone_id(token: str) -> str:
    """The block id ``abort`` stages to mark ``token`` dead (same length as part ids)."""
    return f"{token}-aborted."


def _written(
    key: str, size: int, response: Mapping[str, Any], *, verified: bool = False
) -> ObjectInfo:
    """What ``stat`` would say, from a Put Blob / Put Block List response."""
    modified = response.get("last_modified")
    mtime = modified.timestamp() if modified else None
    return ObjectInfo(key, size, response.get("etag"), mtime, verified=verified)


class AzureBackend:
    """A container (and optional prefix) in an Azure storage account."""

    def __init__(
        self,
        account: str,
        container: str,
        prefix: str = "",
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        account_key: str | None = None,
        sas_token: str | None = None,
        anonymous: bool = False,
        page_size: int = 5000,
        checksum: str = "md5",
        max_pool_connections: int = 64,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        min_rate_bytes: float = MIN_RATE_BYTES,
        copy_timeout: int = 3600,
    ) -> None:
        if len(container) < 3:
            raise ConfigError(f"Azure container name {container!r} is too short (3 minimum)")
        if checksum not in ("none", "md5"):
            raise ConfigError(f"checksum must be none or md5, not {checksum!r}")
        self.account = account
        self.container = container
        self.prefix = root_prefix(prefix)
        self.page_size = page_size
        self.checksum = checksum
        self.copy_timeout = copy_timeout
        self._connection_string = connection_string
        self._account_url = account_url or f"https://{account}.blob.core.windows.net"
        self._explicit_url = account_url is not None
        self._account_key = account_key
        self._sas_token = sas_token
        self._anonymous = anonymous
        self._pool = max_pool_connections
        self.timeouts = Timeouts(connect_timeout, read_timeout, min_rate_bytes)
        self._endpoint = None if connection_string else host_port(self._account_url)
        self._container_client: Any = None
        # The service client owns the HTTP session: the container client's close() is a
        # no-op on the shared transport, so close() must close the service client itself.
        self._service: Any = None
        self._credential: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, parsed: SplitResult, options: Mapping[str, Any]) -> Self:
        url = f"az://{parsed.netloc}{parsed.path}"
        check_options(options, _OPTIONS, url)
        container, _, prefix = parsed.path.lstrip("/").partition("/")
        if not parsed.netloc or not container:
            raise ConfigError(f"{url}: expected az://account/container/prefix")
        timeouts = Timeouts.from_options(options)
        return cls(
            parsed.netloc,
            container,
            prefix,
            connection_string=opt_str(options, "connection_string"),
            account_url=opt_str(options, "account_url"),
            account_key=opt_str(options, "account_key"),
            sas_token=opt_str(options, "sas_token"),
            anonymous=opt_bool(options, "anonymous", False),
            page_size=opt_int(options, "page_size", 5000),
            checksum=opt_str(options, "checksum") or "md5",
            max_pool_connections=opt_int(options, "max_pool_connections", 64),
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read_floor,
            min_rate_bytes=timeouts.min_rate,
            copy_timeout=opt_int(options, "copy_timeout", 3600),
        )

    # -- plumbing ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        root = f"az://{self.account}/{self.container}"
        return f"{root}/{self.prefix}" if self.prefix else root

    def _url(self, key: str) -> str:
        return join_url(self.url, key)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _errors(self, url: str) -> AbstractContextManager[None]:
        return azure_errors(url, endpoint=lambda: self._endpoint)

    def _sized(self, nbytes: int = 0) -> dict[str, float]:
        """Per-call transport timeouts: connect, and a read timeout sized to ``nbytes``."""
        return {
            "connection_timeout": self.timeouts.connect,
            "read_timeout": self.timeouts.read(nbytes),
        }

    def prepare(self) -> None:
        _ = self.container_client  # builds it (no request)

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of the blob endpoint in use; builds the client (no request)."""
        _ = self.container_client
        return self._endpoint

    @property
    def container_client(self) -> Any:
        """The SDK's ContainerClient, built on first use (no network I/O)."""
        if self._container_client is None:
            with self._lock, self._errors(self.url):
                if self._container_client is None:
                    self._service = self._build()
                    self._endpoint = host_port(self._service.url)
                    self._container_client = self._service.get_container_client(self.container)
        return self._container_client

    def _build(self) -> Any:
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient

        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=self._pool, max_retries=0
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        kwargs: dict[str, Any] = {
            "retry_total": 0,
            "transport": RequestsTransport(
                session=session,
                session_owner=True,
                connection_timeout=self.timeouts.connect,
                read_timeout=self.timeouts.read_floor,
                # azure-core reads bodies in 4 KiB blocks by default: 40 MB/s of Python loop.
                connection_data_block_size=1 * MiB,
            ),
            "connection_timeout": self.timeouts.connect,
            "read_timeout": self.timeouts.read_floor,
            # One GET per read_range (the SDK would otherwise split ranges above 32 MiB).
            "max_single_get_size": 4096 * MiB,
            "max_chunk_get_size": 4096 * MiB,
        }
        connection, key, sas = self._connection_string, self._account_key, self._sas_token
        if not (connection or key or sas or self._anonymous):
            kind, value = credential_source(
                self.account, os.environ, connection_string=not self._explicit_url
            )
            connection = value if kind == "connection_string" else None
            key = value if kind == "account_key" else None
            sas = value if kind == "sas_token" else None
        if connection:
            return BlobServiceClient.from_connection_string(connection, **kwargs)
        credential: Any
        if self._anonymous:
            credential = None
        elif key:
            credential = {"account_name": self.account, "account_key": key}
        elif sas:
            credential = sas
        else:
            from azure.identity import DefaultAzureCredential

            credential = self._credential = DefaultAzureCredential()
        return BlobServiceClient(self._account_url, credential=credential, **kwargs)

    def _blob(self, key: str) -> Any:
        return self.container_client.get_blob_client(self._name(key))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            server_side_copy=True,
            native_checksums=("md5",) if self.checksum == "md5" else (),
            conditional_read=True,
            lists_parts=True,
            min_part_size=1,
            max_part_size=4000 * MiB,
            max_parts=50_000,
            verified_writes=self.checksum == "md5",
        )

    # -- reading ----------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        with self._errors(self._url(key)):
            props = self._blob(key).get_blob_properties()
        return ObjectInfo(
            key=key,
            size=int(props.size),
            etag=props.etag,
            mtime=props.last_modified.timestamp() if props.last_modified else None,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        def listing() -> Iterator[ObjectInfo]:
            with self._errors(self._url(prefix)):
                blobs = self.container_client.list_blobs(
                    name_starts_with=join_key(self.prefix, prefix),
                    results_per_page=self.page_size,
                )
                for blob in blobs:
                    yield ObjectInfo(
                        key=relative_key(self.prefix, blob.name),
                        size=int(blob.size),
                        etag=blob.etag,
                        mtime=blob.last_modified.timestamp() if blob.last_modified else None,
                    )

        return codepoint_order(listing(), key=lambda info: info.key)

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        return read_range_by_into(self, key, offset, length, etag)

    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int:
        """One ranged Get Blob whose body is read straight into ``buf`` (``httpbody``).

        The SDK's ``download_blob`` reads the body in blocks and joins them, then copies
        again into the caller's buffer: three passes over every byte under the GIL. The
        generated operation below is the same request (same pipeline, signing, timeouts);
        only the body is read by us. Content-MD5 of ranges up to 4 MiB (``checksum=md5``)
        is checked here because the SDK's check would read the body itself.
        """
        view = memoryview(buf).cast("B")
        length = len(view)
        if offset < 0:
            raise ValueError(f"bad range offset={offset}")
        url = self._url(key)
        if length == 0:
            self._check_pin(key, etag)
            return 0
        from azure.core.exceptions import HttpResponseError
        from azure.storage.blob._generated.models import ModifiedAccessConditions
        from azure.storage.blob._shared.response_handlers import process_storage_error

        md5 = self.checksum == "md5" and length <= 4 * MiB  # the service hashes <= 4 MiB
        with self._errors(url):
            try:
                response = (
                    self._blob(key)
                    ._client.blob.download(
                        range=f"bytes={offset}-{offset + length - 1}",
                        range_get_content_md5=md5 or None,
                        modified_access_conditions=ModifiedAccessConditions(if_match=etag)
                        if etag
                        else None,
                        cls=lambda pipeline_response, _body, _headers: pipeline_response,
                        **self._sized(length),
                    )
                    .http_response
                )
            except HttpResponseError as exc:
                past_end = exc.status_code == 416  # offset at or past the end
                if past_end and offset >= self._check_pin(key, etag).size:
                    return 0
                try:
                    process_storage_error(exc)  # the SDK's typed error, with its error code
                except HttpResponseError as typed:
                    raise typed from None
            got = read_body_into(response.internal_response.raw, view)
        if md5:
            self._check_md5(view[:got], response.headers.get("Content-MD5"), url)
        return got

    @staticmethod
    def _check_md5(data: memoryview, header: str | None, url: str) -> None:
        import base64
        import hashlib

        digest = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        if header is None or header != digest:
            raise TransientError(f"range read with Content-MD5 {header}, hashed {digest}", url=url)

    def _check_pin(self, key: str, etag: str | None) -> ObjectInfo:
        return check_pin(self.stat(key), etag, self._url(key))

    # -- writing ----------------------------------------------------------------------

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> SingleRequestWriter | _AzureBlockWriter:
        check_key(key)
        layout = PartLayout(size, part_size)
        single = single_writer(key, layout, token, self.upload)
        if single is not None:
            return single
        caps = self.capabilities
        if layout.count > caps.max_parts or part_size > caps.max_part_size:
            raise ValueError(
                f"Azure block blobs allow 50,000 blocks of <= 4000 MiB "
                f"(size {size}, part_size {part_size})"
            )
        if token is None:
            return _AzureBlockWriter(self, key, layout, new_token())
        if len(token) != 16 or not token.isalnum():
            raise ValueError(f"not an Azure writer token: {token!r}")
        writer = _AzureBlockWriter(self, key, layout, token)
        if writer.aborted():
            raise NotFound(f"upload {token} was aborted", url=self._url(key))
        return writer

    def upload(self, key: str, data: bytes) -> ObjectInfo:
        """One Put Blob (small objects), replacing any existing blob."""
        kwargs: dict[str, Any] = {"overwrite": True}
        if self.checksum == "md5":
            kwargs["validate_content"] = "md5"
        with self._errors(self._url(key)):
            done = self._blob(key).upload_blob(
                data, length=len(data), **kwargs, **self._sized(len(data))
            )
        return _written(key, len(data), done, verified=self.checksum == "md5")

    def delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors(self._url(key)):
            try:
                self._blob(key).delete_blob(delete_snapshots="include")
            except ResourceNotFoundError as exc:
                if error_code(exc) == "ContainerNotFound":
                    raise  # a missing container is an error; a missing blob is not

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        """Server-side Copy Blob from URL, pinned to the source's ETag, waited for."""
        from azure.core import MatchConditions

        src = source if source is not None and source.etag else self.stat(src_key)
        url = self._url(dst_key)
        dst = self._blob(dst_key)
        with self._errors(url):
            result = dst.start_copy_from_url(
                self._blob(src_key).url,
                source_etag=src.etag,
                source_match_condition=MatchConditions.IfNotModified,
            )
            status = result.get("copy_status")
            deadline = time.monotonic() + self.copy_timeout
            delay = 0.05
            while status == "pending":
                if time.monotonic() > deadline:
                    dst.abort_copy(result["copy_id"])
                    raise TransientError(f"copy not done after {self.copy_timeout}s", url=url)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                status = dst.get_blob_properties().copy.status
            if status != "success":
                raise TransientError(f"server-side copy ended with status {status}", url=url)
        # The copy's own size and ETag (a copy gets an ETag of its own, so nothing in the
        # answer proves which source version was copied).
        return self.stat(dst_key)

    def close(self) -> None:
        with self._lock:
            service, credential = self._service, self._credential
            self._container_client = self._service = self._credential = None
        if service is not None:
            service.close()  # closes the transport's requests session and its sockets
        if credential is not None:
            credential.close()


class _AzureBlockWriter:
    """Stage Block per part, Put Block List at commit; the token names this attempt."""

    def __init__(self, backend: AzureBackend, key: str, layout: PartLayout, token: str):
        self._b = backend
        self._key = key
        self._url = backend._url(key)
        self._layout = layout
        self._token = token
        # Parts this writer staged with Content-MD5 (the service refuses a mismatch).
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        return self._token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        self._layout.check(index, len(data))
        kwargs: dict[str, Any] = {}
        if self._b.checksum == "md5":
            kwargs["validate_content"] = "md5"
        with self._b._errors(self._url):
            self._b._blob(self._key).stage_block(
                block_id(self._token, index),
                bytes(data),
                length=len(data),
                **kwargs,
                **self._b._sized(len(data)),
            )
        if kwargs:
            with self._lock:
                self._checked.add(index)

    def part_proof(self, index: int) -> str | None:
        """``md5`` for a block staged here with Content-MD5, which the service checked."""
        with self._lock:
            return "md5" if index in self._checked else None

    def accept_part_proofs(self, proofs: Mapping[int, str]) -> None:
        """Blocks of this upload that earlier writers staged with a checked Content-MD5:
        their ids name the token and the index, so the committed list names them."""
        if self._b.checksum != "md5":
            return
        count = self._layout.count
        with self._lock:
            self._checked.update(i for i, p in proofs.items() if p == "md5" and 0 <= i < count)

    def _staged(self) -> list[Any]:
        from azure.core.exceptions import ResourceNotFoundError

        with self._b._errors(self._url):
            try:
                _, uncommitted = self._b._blob(self._key).get_block_list("uncommitted")
            except ResourceNotFoundError as exc:
                if error_code(exc) == "ContainerNotFound":
                    raise
                return []  # no blob and no staged blocks yet
        return list(uncommitted)

    def aborted(self) -> bool:
        dead = tombstone_id(self._token)
        return any(str(block.id) == dead for block in self._staged())

    def durable_parts(self) -> set[int]:
        head = f"{self._token}-"
        found: set[int] = set()
        uncommitted = self._staged()
        if any(str(block.id) == tombstone_id(self._token) for block in uncommitted):
            return found
        for block in uncommitted:
            name = str(block.id)
            if not name.startswith(head) or not name[len(head) :].isdigit():
                continue
            index = int(name[len(head) :])
            if index < self._layout.count and block.size == self._layout.length(index):
                found.add(index)
        return found

    def commit(self) -> ObjectInfo:
        from azure.storage.blob import BlobBlock

        blocks = [BlobBlock(block_id=block_id(self._token, i)) for i in range(self._layout.count)]
        with self._b._errors(self._url):
            try:
                done = self._b._blob(self._key).commit_block_list(
                    blocks, **self._b._sized(self._layout.size)
                )
            except Exception as exc:
                if error_code(exc) == "InvalidBlockList":
                    missing = sorted(set(range(self._layout.count)) - self.durable_parts())
                    raise StorageError(
                        f"cannot commit: {len(missing)} of {self._layout.count} parts missing"
                        + (f" (first: {missing[0]})" if missing else ""),
                        url=self._url,
                    ) from exc
                raise
        # Block ids name this writer and the part index: the committed list is exactly the
        # blocks staged here, each checked by the service, when this writer staged them all.
        with self._lock:
            verified = set(range(self._layout.count)) <= self._checked
        return _written(self._key, self._layout.size, done, verified=verified)

    def abort(self) -> None:
        """Mark the attempt dead; its blocks stay invisible until the service reaps them."""
        with self._b._errors(self._url):
            self._b._blob(self._key).stage_block(tombstone_id(self._token), b"\0", length=1)

    def close(self) -> None:
        """Nothing local to release (the upload state lives in the store)."""
