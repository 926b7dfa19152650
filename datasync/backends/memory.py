"""In-process backend for fast tests: ``memory://NAME/PREFIX``.

It keeps the same rules as the real stores (and passes the same conformance suite):
nothing is visible before ``commit``, ``abort`` leaves nothing, listing pages through keys
in ascending order, ``durable_parts`` reports staged parts, a resumed token that no longer
exists raises ``NotFound``. ``NAME`` picks a process-global store, so two opens of the same
URL see the same objects; ``PREFIX`` is the root inside it.

Fault injection (``MemoryBackend.inject``) makes the next N calls of chosen operations
raise an error, to test retries and error handling without a network.

Options: ``page_size`` (listing page, default 1000), ``create`` (default true; false makes a
missing store behave like a missing bucket: every call raises ``NotFound``).
"""

from __future__ import annotations

import bisect
import builtins
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult

from datasync.backends.base import (
    Capabilities,
    ObjectInfo,
    PartLayout,
    SmallPut,
    check_key,
    join_url,
)
from datasync.backends.cloudcommon import check_pin
from datasync.errors import ConfigError, NotFound, SourceChanged
from datasync.manifest.hashing import digest_bytes

__all__ = ["MemoryBackend", "MemoryWriter", "drop_store"]

_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()
_GENERATION = itertools.count(1)


@dataclass(slots=True)
class _Object:
    data: bytes
    etag: str
    mtime: float


@dataclass(slots=True)
class _Upload:
    key: str  # full key inside the store
    layout: PartLayout
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class _Fault:
    make: Callable[[], Exception]
    remaining: int
    ops: frozenset[str] | None


class _Store:
    """One named store. Every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, _Object] = {}
        self.keys: list[str] = []  # sorted, for paging
        self.uploads: dict[str, _Upload] = {}
        self.faults: list[_Fault] = []

    def put(self, key: str, data: bytes) -> _Object:
        obj = _Object(data, f"m{next(_GENERATION)}", time.time())
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = obj
        return obj

    def remove(self, key: str) -> None:
        if self.objects.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]


def drop_store(name: str) -> None:
    """Forget store ``name`` and its bytes (tests call this to free memory)."""
    with _STORES_LOCK:
        _STORES.pop(name, None)


class MemoryBackend:
    """A dict behind the backend protocol. Thread-safe."""

    def __init__(self, name: str, prefix: str = "", *, page_size: int = 1000, create: bool = True):
        if not name:
            raise ConfigError("memory URL needs a store name: memory://NAME/PREFIX")
        if page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {page_size}")
        self.name = name
        self.prefix = prefix.strip("/")
        self.page_size = page_size
        with _STORES_LOCK:
            store = _STORES.get(name)
            if store is None and create:
                store = _STORES[name] = _Store()
        self._store = store
        self._url = f"memory://{name}/{self.prefix}" if self.prefix else f"memory://{name}"

    @classmethod
    def from_url(cls, url: SplitResult, options: Mapping[str, Any]) -> MemoryBackend:
        opts = dict(options)
        page_size = int(opts.pop("page_size", 1000))
        create = bool(opts.pop("create", True))
        if opts:
            raise ConfigError(f"unknown memory backend option(s): {', '.join(sorted(opts))}")
        return cls(url.netloc, url.path, page_size=page_size, create=create)

    # -- protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            server_side_copy=True,
            atomic_rename=True,
            hard_links=True,
            conditional_read=True,
            lists_parts=True,
            small_puts=True,
        )

    def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        store = self._enter("stat", key)
        with store.lock:
            obj = store.objects.get(full)
        if obj is None:
            raise NotFound("no such object", url=self._key_url(key))
        return ObjectInfo(key, len(obj.data), obj.etag, obj.mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        full_prefix = root + prefix
        last: str | None = None
        while True:
            store = self._enter("list", prefix)
            page: list[ObjectInfo] = []
            with store.lock:
                keys = store.keys
                i = (
                    bisect.bisect_left(keys, full_prefix)
                    if last is None
                    else bisect.bisect_right(keys, last)
                )
                while i < len(keys) and len(page) < self.page_size:
                    k = keys[i]
                    if not k.startswith(full_prefix):
                        break
                    obj = store.objects[k]
                    page.append(ObjectInfo(k[len(root) :], len(obj.data), obj.etag, obj.mtime))
                    i += 1
            yield from page
            if len(page) < self.page_size:
                return
            last = root + page[-1].key

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        full = self._full(key)
        store = self._enter("read_range", key)
        with store.lock:
            obj = store.objects.get(full)
        if obj is None:
            raise NotFound("no such object", url=self._key_url(key))
        if etag is not None and obj.etag != etag:
            raise SourceChanged(f"etag is {obj.etag}, expected {etag}", url=self._key_url(key))
        return obj.data[offset : offset + length]

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> MemoryWriter:
        full = self._full(key)
        layout = PartLayout(size, part_size)
        store = self._enter("begin", key)
        with store.lock:
            if token is None:
                token = secrets.token_hex(8)
                store.uploads[token] = _Upload(full, layout)
            else:
                upload = store.uploads.get(token)
                if upload is None:
                    raise NotFound(f"upload {token} no longer exists", url=self._key_url(key))
                if upload.key != full or upload.layout != layout:
                    raise ValueError(f"upload {token} was begun for another key or layout")
        return MemoryWriter(self, store, key, token, layout)

    def put_small(
        self, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> builtins.list[SmallPut | Exception]:
        """Each object stored whole (a fault injected on ``put_small`` fails one item)."""
        out: list[SmallPut | Exception] = []
        for key, data in items:
            try:
                full = self._full(key)
                store = self._enter("put_small", key)
                with store.lock:
                    obj = store.put(full, bytes(data))
                    stored = obj.data
                out.append(
                    SmallPut(
                        ObjectInfo(key, len(stored), obj.etag, obj.mtime), digest_bytes(stored)
                    )
                )
            except Exception as exc:
                out.append(exc)
        return out

    def delete(self, key: str) -> None:
        full = self._full(key)
        store = self._enter("delete", key)
        with store.lock:
            store.remove(full)

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        pin = source.etag if source is not None else None
        return self._duplicate("copy", src_key, dst_key, remove_src=False, pin=pin)

    def rename(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self._duplicate("rename", src_key, dst_key, remove_src=True)

    def link(self, src_key: str, dst_key: str) -> ObjectInfo:
        # Stored bytes are immutable, so sharing them is what a hard link means here.
        return self._duplicate("link", src_key, dst_key, remove_src=False)

    def close(self) -> None:
        pass

    # -- fault injection ----------------------------------------------------------------

    def inject(
        self,
        make_error: Callable[[], Exception],
        *,
        times: int = 1,
        ops: Collection[str] | None = None,
    ) -> None:
        """Make the next ``times`` calls of ``ops`` (all operations when None) raise
        ``make_error()``. Operation names are the method names (``put_part``, ``commit``
        ... included). Faults are shared by every backend on the same store."""
        store = self._existing_store("")
        with store.lock:
            store.faults.append(
                _Fault(make_error, times, frozenset(ops) if ops is not None else None)
            )

    # -- internals ------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_url(self, key: str) -> str:
        return join_url(self._url, key)

    def _enter(self, op: str, key: str) -> _Store:
        """The store, after raising a missing-store error or an injected fault."""
        store = self._existing_store(key)
        with store.lock:
            fault = next(
                (f for f in store.faults if f.remaining > 0 and (f.ops is None or op in f.ops)),
                None,
            )
            if fault is None:
                return store
            fault.remaining -= 1
            store.faults = [f for f in store.faults if f.remaining > 0]
        raise fault.make()

    def _existing_store(self, key: str) -> _Store:
        if self._store is None:
            raise NotFound(f"memory store {self.name!r} does not exist", url=self._key_url(key))
        return self._store

    def _duplicate(
        self, op: str, src_key: str, dst_key: str, *, remove_src: bool, pin: str | None = None
    ) -> ObjectInfo:
        src, dst = self._full(src_key), self._full(dst_key)
        store = self._enter(op, src_key)
        with store.lock:
            obj = store.objects.get(src)
            if obj is None:
                raise NotFound("no such object", url=self._key_url(src_key))
            check_pin(ObjectInfo(src_key, len(obj.data), obj.etag), pin, self._key_url(src_key))
            new = store.put(dst, obj.data)
            if remove_src and src != dst:
                store.remove(src)
        return ObjectInfo(dst_key, len(new.data), new.etag, new.mtime)


class MemoryWriter:
    """A staged upload: parts live in the store (so another writer can resume them)."""

    def __init__(
        self, backend: MemoryBackend, store: _Store, key: str, token: str, layout: PartLayout
    ) -> None:
        self._backend = backend
        self._store = store
        self._key = key
        self._token = token
        self._layout = layout

    @property
    def token(self) -> str:
        return self._token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        chunk = bytes(data)
        self._layout.check(index, len(chunk))
        self._backend._enter("put_part", self._key)
        with self._store.lock:
            self._upload().parts[index] = chunk

    def durable_parts(self) -> set[int]:
        with self._store.lock:
            return set(self._upload().parts)

    def commit(self) -> ObjectInfo:
        self._backend._enter("commit", self._key)
        with self._store.lock:
            upload = self._upload()
            missing = set(range(self._layout.count)) - set(upload.parts)
            if missing:
                raise ValueError(f"cannot commit {self._key}: parts {sorted(missing)} missing")
            data = b"".join(upload.parts[i] for i in range(self._layout.count))
            obj = self._store.put(upload.key, data)
            del self._store.uploads[self._token]
        return ObjectInfo(self._key, len(data), obj.etag, obj.mtime)

    def abort(self) -> None:
        self._backend._enter("abort", self._key)
        with self._store.lock:
            self._store.uploads.pop(self._token, None)

    def close(self) -> None:
        """Nothing local to release (the upload state lives in the store)."""

    def _upload(self) -> _Upload:
        upload = self._store.uploads.get(self._token)
        if upload is None:
            raise NotFound(
                f"upload {self._token} no longer exists", url=self._backend._key_url(self._key)
            )
        return upload
