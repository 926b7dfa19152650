"""Registration sources in object stores: ``s3://``, ``az://``, ``gs://`` and ``SITE:path``.

``RemoteSources(settings)`` turns a source string into a backend rooted at that URL and
streams canonical ``FileEntry`` values from it with ``cloudscan.scan_backend`` (parallel
ranged reads, pinned to each object's ETag/generation). Credentials and endpoints come from
the ``[sites.NAME]`` table that holds the URL, else from the SDK's own chain.

Schemes that no datasync backend serves (``http(s)://``, ``sftp://``, ...) are read through
fsspec's read-only ``FsspecSource``: registration only, never transfers, since the SDK
backends measured at least as fast and pin reads to object versions
(``docs/bench-results/fsspec.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from datasync.backends.base import Backend
from datasync.backends.cloudscan import scan_backend
from datasync.backends.fsspecsrc import FsspecSource
from datasync.backends.registry import has_backend, open_backend
from datasync.config import Settings
from datasync.errors import UserError
from datasync.models import FileEntry
from datasync.transfer.sites import site_for_source

__all__ = ["RemoteSources"]

ProgressCallback = Callable[[int, int], None]


class RemoteSources:
    """Resolves and scans remote registration sources. Built once by ``bootstrap``."""

    def __init__(self, settings: Settings, *, read_workers: int = 8) -> None:
        self.settings = settings
        self.read_workers = read_workers

    def resolve(self, source: str) -> tuple[str, dict[str, object]]:
        """``(url, backend options)`` for ``source``; ``SITE:path`` uses that site's URL."""
        found = site_for_source(self.settings, source)
        if found is not None:
            site = self.settings.sites[found[0]]
            return _join(site.url, found[1]), dict(site.options)
        head, sep, rest = source.partition(":")
        if sep and not rest.startswith("//"):
            raise UserError(f"{source}: no site named {head!r} in the configuration")
        return source, {}

    def scan(
        self, source: str, chunk_size: int, on_progress: ProgressCallback | None = None
    ) -> Iterator[FileEntry]:
        url, options = self.resolve(source)
        backend = _open_source(url, options)
        try:
            yield from scan_backend(
                backend,
                "",
                chunk_size=chunk_size,
                workers=self.read_workers,
                on_progress=on_progress,
            )
        finally:
            backend.close()


def _open_source(url: str, options: dict[str, object]) -> Backend:
    if has_backend(url):
        return open_backend(url, options)
    return FsspecSource(url, options)  # registration only: any scheme fsspec knows


def _join(root: str, rel: str) -> str:
    rel = rel.strip("/")
    return f"{root.rstrip('/')}/{rel}" if rel else root
