"""Sites: what each configured site can do, whether it answers, and what it already holds.

* ``list_sites`` reports every ``[sites.NAME]`` with its backend's declared capabilities
  (no network) and, on request, a health probe (list one key, bounded by a timeout).
* ``SiteHealth``: the same probe as a worker's chore; a site found down holds its queued
  tasks (``TaskStates.pause_site``) with the reason, instead of letting them fail.
* Source replicas: a version registered from a directory or URL that is (under) a
  configured site's root has its files at ``<relative root>/<path>`` there.
  ``site_for_source`` finds that site and prefix; the state owner records the files as
  ``source`` replicas (``ReplicaStates.record_sources``) so the planner can read them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.backends.cloudcommon import HasEndpoint
from datasync.backends.registry import open_backend, parse_url, redact
from datasync.config import Settings, site_root
from datasync.db.engine import DB_UNAVAILABLE
from datasync.db.transfer_tables import Task
from datasync.errors import DatasyncError, Throttled
from datasync.events import Event, TaskRetried
from datasync.retry import is_retryable

__all__ = [
    "HEALTH_PAUSE",
    "HEALTH_TIMEOUT",
    "SiteHealth",
    "SiteInfo",
    "list_sites",
    "site_for_source",
]

log = logging.getLogger(__name__)
HEALTH_TIMEOUT = 5.0  # seconds a worker's probe of a suspect site may take
HEALTH_PAUSE = 90.0  # seconds a site found down holds its tasks (probed again meanwhile)


class SiteInfo(BaseModel):
    name: str
    url: str
    backend: str
    endpoint: str | None  # host:port of an object store's endpoint (None for POSIX)
    concurrency: int
    bandwidth_mbps: float | None
    quota_bytes: int | None
    cost_per_gb: dict[str, float]
    capabilities: dict[str, Any] | None
    healthy: bool | None
    latency_seconds: float | None
    error: str | None
    paused_until: datetime | None = None  # an operator's pause (``datasync pause``)
    pause_reason: str | None = None


def site_for_source(settings: Settings, source: str) -> tuple[str, str] | None:
    """The configured site whose root holds ``source``, and the prefix under it.

    ``source`` is a directory, a URL, ``SITE:path``, or a version's recorded source
    (``directory:/abs/path``). Returns ``(site, prefix)`` (prefix ``""`` or ending ``/``),
    or None when no site holds it.
    """
    if source.startswith("directory:"):
        source = source[len("directory:") :]
    elif source.startswith("manifest:"):
        return None
    head, sep, rest = source.partition(":")
    if sep and head in settings.sites and not rest.startswith("//"):
        rel = rest.strip("/")
        return head, f"{rel}/" if rel else ""
    try:
        scheme, root = site_root(source)
    except DatasyncError:
        return None
    best: tuple[str, str] | None = None
    for name, site in sorted(settings.sites.items()):
        try:
            site_scheme, top = site_root(site.url)
        except DatasyncError:
            continue
        if site_scheme != scheme:
            continue
        if root == top:
            rel = ""
        elif root.startswith(top.rstrip("/") + "/"):
            rel = root[len(top.rstrip("/")) + 1 :]
        else:
            continue
        # Site roots never nest (``Settings`` refuses it); keep the deepest all the same.
        if best is None or len(rel) < len(best[1]):
            best = (name, f"{rel}/" if rel else "")
    return best


# Opening a backend is local work (an SDK import, a client built), bounded on its own: under
# CPU load two SDKs loading at once can take seconds, and that is not a site being down.
OPEN_TIMEOUT = 30.0


def _probe_all(
    settings: Settings, names: Iterable[str], *, probe: bool, timeout: float
) -> dict[str, dict[str, Any]]:
    """What ``_inspect`` found for each site named, all in parallel: backends opened first
    (``OPEN_TIMEOUT``), then every probe within ``timeout``. A site that did not finish
    has ``error`` "no answer" (and ``retryable``)."""
    results: dict[str, dict[str, Any]] = {name: {} for name in sorted(names)}
    opened = {name: threading.Event() for name in results}
    threads = [
        threading.Thread(
            target=_inspect,
            args=(settings.sites[name].url, settings.sites[name].options, probe, found),
            kwargs={"opened": opened[name]},
            name=f"datasync-probe-{name}",
            daemon=True,
        )
        for name, found in results.items()
    ]
    for thread in threads:
        thread.start()
    open_end = time.monotonic() + OPEN_TIMEOUT
    for event in opened.values():
        event.wait(max(0.0, open_end - time.monotonic()))
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    out: dict[str, dict[str, Any]] = {}
    for name, found in results.items():
        copy = dict(found)  # the thread may still write to its own
        if "error" not in copy and ((probe and "latency" not in copy) or "caps" not in copy):
            where = f" from {copy['endpoint']}" if copy.get("endpoint") else ""
            copy.update(error=f"no answer{where} within {timeout:g}s", retryable=True)
        out[name] = copy
    return out


def list_sites(settings: Settings, *, probe: bool = True, timeout: float = 5.0) -> list[SiteInfo]:
    """Configured sites with their capabilities and (``probe``) a cheap health check.

    Capabilities come from opening the backend (no network for any of ours). The probe
    lists at most one key under the site root. Each site runs in a daemon thread bounded
    by one overall ``timeout``, so a hung endpoint neither blocks the answer nor the exit
    of the process; a slow or failing site is reported, never raised. Errors name the
    endpoint (``host:port``) of an object store, not only its bucket.
    """
    results = _probe_all(settings, settings.sites, probe=probe, timeout=timeout)
    infos: list[SiteInfo] = []
    for name, site in sorted(settings.sites.items()):
        found = results[name]
        error = found.get("error")
        try:
            backend = parse_url(site.url).scheme
        except DatasyncError:
            backend = "?"
        infos.append(
            SiteInfo(
                name=name,
                url=redact(site.url),
                backend=backend,
                endpoint=found.get("endpoint"),
                concurrency=site.concurrency,
                bandwidth_mbps=site.bandwidth_mbps,
                quota_bytes=site.quota_bytes,
                cost_per_gb=dict(site.cost_per_gb),
                capabilities=found.get("caps"),
                healthy=(error is None) if probe else None,
                latency_seconds=found.get("latency"),
                error=error,
            )
        )
    return infos


def _inspect(
    url: str, options: dict[str, Any], probe: bool, out: dict[str, Any], *, opened: threading.Event
) -> None:
    """Fill ``out`` with ``endpoint``, ``caps``, then ``latency`` (probe) or ``error`` and
    ``retryable``; sets ``opened`` once the backend is open (or failed to); never raises."""
    try:
        backend = open_backend(url, options)
    except Exception as exc:  # a broken SDK or config must not break `datasync sites`
        out.update(error=f"{type(exc).__name__}: {exc}", retryable=False)
        return
    finally:
        opened.set()
    try:
        if isinstance(backend, HasEndpoint):
            out["endpoint"] = backend.endpoint
        caps = backend.capabilities
        out["caps"] = {
            name: list(value) if isinstance(value, tuple) else value
            for name in getattr(caps, "__dataclass_fields__", {})
            for value in (getattr(caps, name),)
        }
        if probe:
            start = time.monotonic()
            next(iter(backend.list("")), None)
            out["latency"] = time.monotonic() - start
    except Exception as exc:
        # Throttling is the site pacing us (the AIMD limits' business), not the site down.
        down = is_retryable(exc) and not isinstance(exc, Throttled)
        out.update(error=f"{type(exc).__name__}: {exc}", retryable=down)
    finally:
        with contextlib.suppress(Exception):
            backend.close()


class SiteHealth:
    """Sites that are down pause their tasks instead of burning their attempts.

    A chore of every worker (``WorkerParts.chores``): the sites this process saw a call
    retried on after a network error (``suspect``, from ``RetryingBackend``'s hook) or a
    task retried for (``TaskRetried``) since the last check, and those it found down
    before, are probed like ``datasync sites`` does. A site whose probe fails with a
    retryable error other than throttling (no answer, a refused connection, a timeout,
    5xx) holds its queued tasks for ``pause`` seconds with the reason, through the state
    owner (``pause_site``); attempts are not counted. Tasks already running finish their
    attempt. A site that answers again is left alone: its tasks are due when the pause
    ends. A throttled probe (the AIMD limits handle that) and a permanent error
    (credentials, a missing bucket) pause nothing: the latter fails the tasks with that
    reason, which someone must fix.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pause_site: Callable[[str, datetime, str], int],
        *,
        timeout: float = HEALTH_TIMEOUT,
        pause: float = HEALTH_PAUSE,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pause_site = pause_site
        self.timeout = timeout
        self.pause = pause
        self._retried: set[int] = set()
        self._suspects: set[str] = set()
        self._down: set[str] = set()
        self._lock = threading.Lock()

    def suspect(self, site: str) -> None:
        """A call to ``site`` failed with a network error: probe it at the next check."""
        with self._lock:
            self._suspects.add(site)

    def on_event(self, event: Event) -> None:
        if isinstance(event, TaskRetried):
            with self._lock:
                self._retried.add(event.task_id)

    def check(self) -> dict[str, str]:
        """Probe the suspect sites; pause the tasks of those down. Returns site -> reason.

        It runs on the worker's heartbeat thread: nothing but a database outage (which
        the heartbeat handles) may leave it."""
        try:
            return self._check()
        except DB_UNAVAILABLE:
            raise
        except Exception:
            log.warning("site health check failed", exc_info=True)
            return {}

    def _check(self) -> dict[str, str]:
        with self._lock:
            retried, self._retried = self._retried, set()
            suspects, self._suspects = self._suspects | self._down, set()
        suspects |= self._sites_of(retried)
        suspects &= set(self.settings.sites)
        if not suspects:
            return {}
        found = _probe_all(self.settings, suspects, probe=True, timeout=self.timeout)
        until = datetime.now(UTC) + timedelta(seconds=self.pause)
        paused: dict[str, str] = {}
        for name, result in found.items():
            if "error" not in result or not result.get("retryable"):
                continue
            paused[name] = (
                f"site {name} is DOWN ({result['error']}); its tasks wait until"
                f" {until.isoformat(timespec='seconds')} and are tried again then"
            )
            self.pause_site(name, until, paused[name])
        with self._lock:
            self._down = set(paused)
        return paused

    def _sites_of(self, task_ids: set[int]) -> set[str]:
        ids = sorted(task_ids)
        sites: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                rows = conn.execute(
                    sa.select(col(Task.src_site), col(Task.dst_site)).where(
                        col(Task.id).in_(ids[i : i + 500])
                    )
                )
                sites.update(name for row in rows for name in row if name)
        return sites
