"""Google Cloud Storage through google-cloud-storage.

URL ``gs://bucket/prefix``. Options: ``project``, ``endpoint`` (an emulator or private
endpoint; ``STORAGE_EMULATOR_HOST`` is honoured too), ``anonymous`` (default true when an
emulator endpoint is used), ``credentials_file`` (service-account JSON), else Application
Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file, the metadata
server); ``page_size`` (default 1000), ``max_pool_connections``, ``connect_timeout``,
``read_timeout`` (``timeout`` is its older name) and ``min_rate_bytes``
(``cloudcommon.Timeouts``: each call's read timeout is sized to its bytes), and
``conditional_read`` to override the per-endpoint default (below).

Invariants:

* No I/O at construction; the client is built on first use. Library retries are off
  (``retry=None``): ``RetryingBackend`` decides.
* Chunked writes are parallel composite uploads: part ``i`` is written as the temporary
  object ``<prefix>/.datasync-parts/<token>/<i:08d>`` (CRC32C checked by the library against
  the server's value), ``durable_parts`` lists those objects (the resume story), ``commit``
  composes them into the key in a tree of at most 32 sources per call and deletes the
  temporaries, ``abort`` deletes them. ``.datasync-parts/`` is reserved and never listed.
  The final object has a CRC32C but no MD5 (GCS never gives composites an MD5).
* Objects that fit in one part are buffered and uploaded with one request at commit.
* A commit is ``verified`` (``base.py``, "Verified writes") when the server's CRC32C of
  each part this writer sent, and of the composed object, equals ours (``crc32c.py``).
* Ranged reads are one GET on the media URL whose body lands in the caller's buffer
  (``httpbody.py``).
* Reads are pinned with ``if_generation_match``; ``ObjectInfo.etag`` is the generation.
  ``gcp-storage-emulator`` ignores that precondition, so ``capabilities.conditional_read``
  is False for emulator endpoints (set the option to force either way).
* Errors go through ``gcs_errors`` (one place, in ``gcs_errors.py``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Self
from urllib.parse import SplitResult, quote

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
    new_token,
    opt_bool,
    opt_int,
    opt_str,
    parse_retry_after,
    relative_key,
    root_prefix,
    single_writer,
)
from datasync.backends.crc32c import crc32c_b64, crc32c_concat, crc32c_of
from datasync.backends.gcs_errors import by_status, gcs_errors, translate
from datasync.backends.httpbody import read_body_into, read_range_by_into
from datasync.errors import ConfigError, NotFound, SourceChanged, StorageError, Throttled

__all__ = ["PARTS_DIR", "GCSBackend", "gcs_errors", "translate"]

_log = logging.getLogger(__name__)
MiB = 1024 * 1024
PARTS_DIR = ".datasync-parts"
COMPOSE_FANIN = 32  # GCS accepts at most 32 sources per compose call
_OPTIONS = TIMEOUT_OPTIONS | {
    "project",
    "endpoint",
    "anonymous",
    "credentials_file",
    "page_size",
    "max_pool_connections",
    "timeout",
    "conditional_read",
}


class GCSBackend:
    """A bucket (and optional prefix) on Google Cloud Storage or an emulator."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        endpoint: str | None = None,
        anonymous: bool | None = None,
        credentials_file: str | None = None,
        page_size: int = 1000,
        max_pool_connections: int = 64,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        min_rate_bytes: float = MIN_RATE_BYTES,
        conditional_read: bool | None = None,
    ) -> None:
        if len(bucket) < 3:
            raise ConfigError(f"GCS bucket name {bucket!r} is too short (3 characters minimum)")
        self.bucket_name = bucket
        self.prefix = root_prefix(prefix)
        self.project = project
        self.endpoint_url = endpoint
        self.page_size = page_size
        self.timeouts = Timeouts(connect_timeout, read_timeout, min_rate_bytes)
        self.timeout = self._sized(0)  # listings, HEADs, deletes: the floor
        self._endpoint = host_port(endpoint)
        self._anonymous = anonymous
        self._credentials_file = credentials_file
        self._pool = max_pool_connections
        self._conditional_read = conditional_read
        self._client: Any = None
        self._bucket: Any = None
        self._lock = threading.Lock()
        self._bucket_seen = False

    @classmethod
    def from_url(cls, parsed: SplitResult, options: Mapping[str, Any]) -> Self:
        url = f"gs://{parsed.netloc}{parsed.path}"
        check_options(options, _OPTIONS, url)
        if not parsed.netloc:
            raise ConfigError(f"{url}: missing bucket name (gs://bucket/prefix)")
        anonymous = options.get("anonymous")
        conditional = options.get("conditional_read")
        older = "timeout" in options and "read_timeout" not in options
        timeouts = Timeouts.from_options(options, floor="timeout" if older else "read_timeout")
        return cls(
            parsed.netloc,
            parsed.path,
            project=opt_str(options, "project"),
            endpoint=opt_str(options, "endpoint"),
            anonymous=None if anonymous is None else opt_bool(options, "anonymous", False),
            credentials_file=opt_str(options, "credentials_file"),
            page_size=opt_int(options, "page_size", 1000),
            max_pool_connections=opt_int(options, "max_pool_connections", 64),
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read_floor,
            min_rate_bytes=timeouts.min_rate,
            conditional_read=None
            if conditional is None
            else opt_bool(options, "conditional_read", True),
        )

    # -- plumbing ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        root = f"gs://{self.bucket_name}"
        return f"{root}/{self.prefix}" if self.prefix else root

    def _url(self, key: str) -> str:
        return join_url(self.url, key)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _errors(self, url: str) -> AbstractContextManager[None]:
        return gcs_errors(url, endpoint=lambda: self._endpoint)

    def _sized(self, nbytes: int) -> tuple[float, float]:
        """``(connect, read)`` timeouts of a call moving ``nbytes`` (``Timeouts.read``)."""
        return (self.timeouts.connect, self.timeouts.read(nbytes))

    def prepare(self) -> None:
        _ = self.client  # builds it (no request)

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of the JSON API in use; builds the client (no request)."""
        _ = self.client
        return self._endpoint

    def _emulator(self) -> str | None:
        """The emulator/custom endpoint in use (option, else ``STORAGE_EMULATOR_HOST``)."""
        return self.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or None

    @property
    def client(self) -> Any:
        """The storage Client, built on first use (reads credentials; no network I/O)."""
        if self._client is None:
            with self._lock, self._errors(self.url):
                if self._client is None:
                    client = self._build()
                    self._endpoint = host_port(client._connection.API_BASE_URL)
                    self._bucket = client.bucket(self.bucket_name)
                    self._client = client
        return self._client

    @property
    def bucket(self) -> Any:
        _ = self.client
        return self._bucket

    def _build(self) -> Any:
        import requests
        from google.cloud import storage

        endpoint = self._emulator()
        anonymous = self._anonymous if self._anonymous is not None else endpoint is not None
        credentials: Any = None
        session: Any
        if self._credentials_file:
            from google.auth.transport.requests import AuthorizedSession
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                self._credentials_file,
                scopes=["https://www.googleapis.com/auth/devstorage.read_write"],
            )
            session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        elif anonymous:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            session = requests.Session()
        else:
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            credentials, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/devstorage.read_write"]
            )
            session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=self._pool, max_retries=0
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        options = {"api_endpoint": endpoint} if endpoint else None
        return storage.Client(
            project=self.project or ("test" if anonymous else None),
            credentials=credentials,
            _http=session,
            client_options=options,
        )

    @property
    def capabilities(self) -> Capabilities:
        conditional = self._conditional_read
        if conditional is None:
            conditional = self._emulator() is None
        return Capabilities(
            server_side_copy=True,
            native_checksums=("crc32c",),
            conditional_read=conditional,
            lists_parts=True,
            min_part_size=1,
            max_part_size=5 * 1024**4,
            max_parts=10_000,
            verified_writes=True,
        )

    def _missing(self, exc: NotFound, url: str) -> StorageError:
        """A 404 does not say whether the bucket or the object is missing: ask once."""
        if not self._bucket_seen:
            with self._errors(url):
                exists = self.bucket.exists(retry=None, timeout=self.timeout)
            if not exists:
                return NotFound(f"bucket missing: gs://{self.bucket_name} does not exist", url=url)
            self._bucket_seen = True
        return exc

    # -- reading ----------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        url = self._url(key)
        blob = self.bucket.blob(self._name(key))
        try:
            with self._errors(url):
                blob.reload(retry=None, timeout=self.timeout)
        except NotFound as exc:
            raise self._missing(exc, url) from exc
        return self._info(key, blob)

    @staticmethod
    def _info(key: str, blob: Any) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(blob.size or 0),
            etag=str(blob.generation) if blob.generation is not None else None,
            mtime=blob.updated.timestamp() if blob.updated else None,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        url = self._url(prefix)
        hidden = join_key(self.prefix, PARTS_DIR + "/")
        try:
            with self._errors(url):
                blobs = self.client.list_blobs(
                    self.bucket_name,
                    prefix=join_key(self.prefix, prefix),
                    page_size=self.page_size,
                    retry=None,
                    timeout=self.timeout,
                )
                for blob in blobs:
                    if blob.name.startswith(hidden):
                        continue
                    yield self._info(relative_key(self.prefix, blob.name), blob)
        except NotFound as exc:
            raise self._missing(exc, url) from exc

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        return read_range_by_into(self, key, offset, length, etag)

    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int:
        """One ranged GET on the JSON API's media URL, its body read straight into ``buf``.

        The library's download path copies the body in 8 KiB steps through a BytesIO
        (about 80 MB/s from 8 threads here); ``httpbody`` reads it with no copy at all.
        """
        view = memoryview(buf).cast("B")
        length = len(view)
        if offset < 0:
            raise ValueError(f"bad range offset={offset}")
        url = self._url(key)
        name = self._name(key)
        if length == 0:
            self._check_pin(key, etag)
            return 0
        query = "alt=media" + (f"&ifGenerationMatch={int(etag)}" if etag else "")
        media = (
            f"{self.client._connection.API_BASE_URL}/download/storage/v1/b/"
            f"{quote(self.bucket_name, safe='')}/o/{quote(name, safe='')}?{query}"
        )
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        got = 0
        with self._errors(url):
            response = self.client._http.get(
                media, headers=headers, stream=True, timeout=self._sized(length)
            )
            try:
                status = response.status_code
                served = response.headers.get("x-goog-generation")
                if status == 206:
                    got = read_body_into(response.raw, view)
                elif status == 200:  # the whole object (a server that ignores Range)
                    whole = response.raw.read(decode_content=False)[offset : offset + length]
                    view[: len(whole)] = whole
                    got = len(whole)
                else:
                    response.content  # noqa: B018 - drain so the connection is reused
            finally:
                response.close()
        if status == 416:  # offset at or past the end
            info = self._check_pin(key, etag)
            if offset >= info.size:
                return 0
        if status not in (200, 206):
            error = by_status(status, url)
            if isinstance(error, Throttled):
                error.retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if isinstance(error, NotFound):
                raise self._missing(error, url)
            raise error
        # Real GCS reports the generation it served; refuse a different one.
        if etag and served is not None and served != etag:
            raise SourceChanged(f"generation {etag} was pinned, {served} was served", url=url)
        return got

    def _check_pin(self, key: str, etag: str | None) -> ObjectInfo:
        return check_pin(self.stat(key), etag, self._url(key), what="generation")

    # -- writing ----------------------------------------------------------------------

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> SingleRequestWriter | _GCSComposeWriter:
        check_key(key)
        layout = PartLayout(size, part_size)
        single = single_writer(key, layout, token, self._put_small)
        if single is not None:
            return single
        if token is not None and (len(token) != 16 or not token.isalnum()):
            raise ValueError(f"not a GCS writer token: {token!r}")
        return _GCSComposeWriter(self, key, layout, token or new_token())

    def upload(self, name: str, data: bytes | memoryview, url: str) -> Any:
        """Upload one object (CRC32C compared with the server's); returns the Blob."""
        import io

        blob = self.bucket.blob(name)
        with self._errors(url):
            blob.upload_from_file(
                io.BytesIO(data),
                size=len(data),
                checksum="crc32c",
                retry=None,
                timeout=self._sized(len(data)),
            )
        return blob

    def _put_small(self, key: str, data: bytes) -> ObjectInfo:
        """One-request upload of a whole object (the single-part writer's commit)."""
        blob = self.upload(self._name(key), data, self._url(key))
        info = self._info(key, blob)
        return replace(info, verified=blob.crc32c == crc32c_b64(crc32c_of(data)))

    def delete(self, key: str) -> None:
        url = self._url(key)
        try:
            with self._errors(url):
                self.bucket.blob(self._name(key)).delete(retry=None, timeout=self.timeout)
        except NotFound as exc:
            missing = self._missing(exc, url)
            if missing is not exc:
                raise missing from exc  # the bucket is gone: that is an error

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        """Server-side rewrite (works for any size), pinned to the source generation."""
        src = source if source is not None and source.etag else self.stat(src_key)
        source = self.bucket.blob(self._name(src_key))
        dest = self.bucket.blob(self._name(dst_key))
        with self._errors(self._url(dst_key)):
            token: str | None = None
            while True:
                token, _, _ = dest.rewrite(
                    source,
                    token=token,
                    if_source_generation_match=int(src.etag) if src.etag else None,
                    retry=None,
                    timeout=self._sized(src.size),
                )
                if token is None:
                    break
        return self._info(dst_key, dest)  # the last rewrite answered with the new object

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _GCSComposeWriter:
    """Parts as temporary objects, composed into the key at commit."""

    def __init__(self, backend: GCSBackend, key: str, layout: PartLayout, token: str):
        self._b = backend
        self._key = key
        self._url = backend._url(key)
        self._layout = layout
        self._token = token
        self._dir = join_key(backend.prefix, f"{PARTS_DIR}/{token}/")
        # Part index -> (CRC32C, length) of parts this writer uploaded whose server CRC32C
        # equalled ours; commit compares the composed object's CRC32C with their combination.
        self._crcs: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        return self._token

    def _part_name(self, index: int) -> str:
        return f"{self._dir}{index:08d}"

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        self._layout.check(index, len(data))
        crc = crc32c_of(data)
        blob = self._b.upload(self._part_name(index), data, self._url)
        with self._lock:
            if blob.crc32c == crc32c_b64(crc):
                self._crcs[index] = (crc, len(data))
            else:  # this send proved nothing, whatever an earlier one did
                self._crcs.pop(index, None)

    def part_proof(self, index: int) -> str | None:
        """``CRC32C:length`` of a part object whose server CRC32C equalled ours."""
        with self._lock:
            known = self._crcs.get(index)
        return None if known is None else f"{known[0]}:{known[1]}"

    def accept_part_proofs(self, proofs: Mapping[int, str]) -> None:
        with self._lock:
            for index, text in proofs.items():
                crc, _, length = text.partition(":")
                if crc.isascii() and crc.isdecimal() and length.isascii() and length.isdecimal():
                    self._crcs.setdefault(index, (int(crc), int(length)))

    def _temporaries(self) -> list[Any]:
        with self._b._errors(self._url):
            return list(
                self._b.client.list_blobs(
                    self._b.bucket_name, prefix=self._dir, retry=None, timeout=self._b.timeout
                )
            )

    def durable_parts(self) -> set[int]:
        found: set[int] = set()
        for blob in self._temporaries():
            tail = blob.name[len(self._dir) :]
            if not tail.isdigit():
                continue  # intermediate compose results
            index = int(tail)
            if index < self._layout.count and blob.size == self._layout.length(index):
                found.add(index)
        return found

    def commit(self) -> ObjectInfo:
        n = self._layout.count
        missing = sorted(set(range(n)) - self.durable_parts())
        if missing:
            raise StorageError(
                f"cannot commit: {len(missing)} of {n} parts missing (first: {missing[0]})",
                url=self._url,
            )
        bucket = self._b.bucket
        level = [bucket.blob(self._part_name(i)) for i in range(n)]
        depth = 0
        with self._b._errors(self._url):
            while len(level) > COMPOSE_FANIN:
                upper = []
                for start in range(0, len(level), COMPOSE_FANIN):
                    node = bucket.blob(f"{self._dir}c{depth:02d}-{start // COMPOSE_FANIN:06d}")
                    node.compose(
                        level[start : start + COMPOSE_FANIN],
                        retry=None,
                        timeout=self._b._sized(self._layout.size),
                    )
                    upper.append(node)
                level, depth = upper, depth + 1
            final = bucket.blob(self._b._name(self._key))
            final.compose(level, retry=None, timeout=self._b._sized(self._layout.size))
        try:
            self._cleanup()
        except StorageError as exc:  # committed already; leftovers are hidden and reported
            _log.warning("could not delete temporary parts under %s: %s", self._dir, exc)
        info = self._b._info(self._key, final)
        return replace(info, verified=self._proved(final.crc32c))

    def _proved(self, server_crc: str | None) -> bool:
        """The composed object's CRC32C (computed by the server) is that of our parts, in
        order, each of which the server also computed as ours."""
        with self._lock:
            parts = [self._crcs.get(i) for i in range(self._layout.count)]
        if server_crc is None or any(p is None for p in parts):
            return False
        return server_crc == crc32c_b64(crc32c_concat([p for p in parts if p is not None]))

    def _cleanup(self) -> None:
        for blob in self._temporaries():
            try:
                with self._b._errors(self._url):
                    blob.delete(retry=None, timeout=self._b.timeout)
            except NotFound:
                pass

    def abort(self) -> None:
        self._cleanup()

    def close(self) -> None:
        """Nothing local to release (the upload state lives in the store)."""
