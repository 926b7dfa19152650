"""What every task runner needs, built once per worker process by the composition root.

``SiteBackends`` opens one backend per configured site on first use (or all of them when a
worker starts, ``warm``) and shares it between the process's threads. ``ExecContext``
carries the state owner, the site index, the manifest store, the backends, the host-wide
limits, the buffer pool and the I/O pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from datasync.backends.base import Backend
from datasync.backends.cloudcommon import Prepares
from datasync.backends.registry import open_backend
from datasync.backends.retrying import RetryingBackend
from datasync.config import SiteConfig
from datasync.errors import ConfigError, DatasyncError, TransientError
from datasync.manifest.store import ManifestStore
from datasync.transfer.buffers import BufferPool
from datasync.transfer.limits import Limits
from datasync.transfer.siteindex import SiteIndex
from datasync.transfer.state import EngineState

__all__ = ["ExecContext", "LeaseLost", "ReplanNeeded", "SiteBackends", "check_cancel"]

log = logging.getLogger(__name__)

BackendOpener = Callable[[str, Mapping[str, Any]], Backend]


class LeaseLost(TransientError):
    """The worker lost the task's lease (another worker owns it now): stop writing."""


class ReplanNeeded(DatasyncError):
    """Blobs the placement counted on are missing or damaged at the site (now marked bad):
    the worker re-plans the placement, which moves them again, instead of failing it."""

    retryable = True


def check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise LeaseLost("lease lost to another worker; stopping this task")


class SiteBackends:
    """One backend per configured site, opened on first use, shared by the process's threads.

    ``wrap(site, backend)`` decorates each backend once it is opened (the composition root
    passes the retry policy's adapter here)."""

    def __init__(
        self,
        sites: Mapping[str, SiteConfig],
        opener: BackendOpener = open_backend,
        wrap: Callable[[str, Backend], Backend] | None = None,
    ) -> None:
        self._sites = dict(sites)
        self._opener = opener
        self._wrap = wrap
        self._open: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def __getitem__(self, site: str) -> Backend:
        with self._lock:
            backend = self._open.get(site)
            if backend is None:
                cfg = self._sites.get(site)
                if cfg is None:
                    raise ConfigError(f"site {site!r} is not configured ([sites.{site}])")
                backend = self._opener(cfg.url, cfg.options)
                if self._wrap is not None:
                    backend = self._wrap(site, backend)
                self._open[site] = backend
            return backend

    @property
    def opened(self) -> frozenset[str]:
        """The sites whose backend this process has opened."""
        with self._lock:
            return frozenset(self._open)

    def warm(self, sites: Collection[str] | None = None) -> None:
        """Open ``sites`` (None: every configured site) and build their SDK clients: the
        imports, credentials and connection pools a site's first task would otherwise pay
        for (about a second of CPU per cloud SDK). No request is made. A site that cannot
        be opened is logged and left to its first task, which reports the error."""
        for site in sorted(self._sites if sites is None else set(sites) & set(self._sites)):
            try:
                backend = self[site]
                inner = backend.unwrap() if isinstance(backend, RetryingBackend) else backend
                if isinstance(inner, Prepares):
                    inner.prepare()
            except Exception as exc:  # a broken site must not stop the worker serving others
                log.warning("site %s not opened at worker start: %s", site, exc)

    def close(self) -> None:
        with self._lock:
            for backend in self._open.values():
                with contextlib.suppress(Exception):
                    backend.close()
            self._open.clear()


@dataclass(frozen=True, slots=True)
class ExecContext:
    state: EngineState
    index: SiteIndex
    manifests: ManifestStore
    backends: SiteBackends
    limits: Limits
    buffers: BufferPool
    io: cf.ThreadPoolExecutor

    @property
    def lanes(self) -> int:
        """How many streams a batch of small blobs is split into: one per I/O thread."""
        return self.io._max_workers
