"""A read-only source over any fsspec filesystem, for registration only.

``FsspecSource.from_url("memory://data", {})`` (or ``http(s)://``, ``sftp://``, ``zip://``
... whatever fsspec and its installed extras know) offers ``stat``, ``list`` and
``read_range``, enough for ``cloudscan.scan_backend``. It never writes: ``begin``,
``delete`` and ``copy`` raise ``Unsupported``. Transfers use the SDK backends, which
measured at least as fast (``docs/bench-results/fsspec.md``) and pin reads to versions.

Invariants and limits:

* fsspec's ``find`` is not a stream: ``list`` holds one prefix's listing in memory, then
  yields it sorted by code point (the protocol's order).
* ``conditional_read`` is False: fsspec offers no generic If-Match, so a source that
  changes during registration is only caught when its size changes.
* Errors: ``FileNotFoundError`` -> ``NotFound``, ``PermissionError`` -> ``PermissionDenied``,
  timeouts and other ``OSError``s -> ``TransientError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn, Self
from urllib.parse import SplitResult, urlunsplit

from datasync.backends.base import Capabilities, ObjectInfo, check_key, join_url
from datasync.backends.cloudcommon import join_key, relative_key
from datasync.errors import (
    NotFound,
    PermissionDenied,
    StorageError,
    TransientError,
    Unsupported,
)

__all__ = ["FsspecSource"]


@contextmanager
def fsspec_errors(url: str) -> Iterator[None]:
    """The one place fsspec/OS errors become ``StorageError``s."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise NotFound("not found", url=url) from exc
    except PermissionError as exc:
        raise PermissionDenied("access denied", url=url) from exc
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise TransientError(f"I/O error: {type(exc).__name__}", url=url) from exc


class FsspecSource:
    """Read-only ``Backend`` over ``fsspec.core.url_to_fs(url, **options)``."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self._url = url.rstrip("/")
        self._options = dict(options or {})
        self._fs: Any = None
        self._root = ""

    @classmethod
    def from_url(cls, parsed: SplitResult, options: Mapping[str, Any]) -> Self:
        return cls(urlunsplit(parsed), options)

    @property
    def url(self) -> str:
        from datasync.backends.registry import redact

        return redact(self._url)  # user:password@ and secret query values masked

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            with fsspec_errors(self.url):
                self._fs, root = fsspec.core.url_to_fs(self._url, **self._options)
            self._root = str(root).rstrip("/")
        return self._fs

    def _path(self, key: str) -> str:
        _ = self.fs  # sets the root
        return join_key(self._root, check_key(key))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def _info(self, key: str, info: Mapping[str, Any]) -> ObjectInfo:
        mtime = info.get("mtime") or info.get("created")
        etag = info.get("ETag") or info.get("etag")
        return ObjectInfo(
            key=key,
            size=int(info.get("size") or 0),
            etag=str(etag) if etag else None,
            mtime=float(mtime) if isinstance(mtime, int | float) else None,
        )

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with fsspec_errors(join_url(self.url, key)):
            info = self.fs.info(path)
        if info.get("type") == "directory":
            raise NotFound("is a directory", url=join_url(self.url, key))
        return self._info(key, info)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        fs = self.fs
        with fsspec_errors(join_url(self.url, prefix)):
            if not fs.exists(self._root or "/"):
                raise NotFound("root does not exist", url=self.url)
            found = fs.find(self._root or "/", detail=True)
        entries = []
        for path, info in found.items():
            key = relative_key(self._root, path) if self._root else str(path).lstrip("/")
            if info.get("type") != "directory" and key.startswith(prefix):
                entries.append((key, info))
        for key, info in sorted(entries, key=lambda item: item[0]):
            yield self._info(key, info)

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        path = self._path(key)
        if length == 0:
            self.stat(key)
            return b""
        with fsspec_errors(join_url(self.url, key)):
            data: bytes = self.fs.cat_file(path, start=offset, end=offset + length)
        return data

    def _read_only(self, what: str) -> NoReturn:
        raise Unsupported(f"{what}: fsspec sources are read-only (registration only)", url=self.url)

    def begin(self, key: str, size: int, part_size: int, *, token: str | None = None) -> Any:
        self._read_only("begin")

    def delete(self, key: str) -> None:
        self._read_only("delete")

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        self._read_only("copy")

    def close(self) -> None:
        self._fs = None
