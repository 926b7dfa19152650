"""Sites: what each configured site can do, whether it answers, and what it already holds.

* ``list_sites`` reports every ``[sites.NAME]`` with its backend's declared capabilities
  (no network) and, on request, a health probe (list one key, bounded by a timeout).
* Source replicas: a version registered from a directory or URL that is (under) a
  configured site's root has its files at ``<relative root>/<path>`` there.
  ``site_for_source`` finds that site and prefix; the state owner records the files as
  ``source`` replicas (``ReplicaStates.record_sources``) so the planner can read them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from pydantic import BaseModel

from datasync.backends.registry import open_backend, parse_url, redact
from datasync.config import Settings
from datasync.errors import DatasyncError

__all__ = [
    "SiteInfo",
    "list_sites",
    "site_for_source",
]


class SiteInfo(BaseModel):
    name: str
    url: str
    backend: str
    concurrency: int
    bandwidth_mbps: float | None
    quota_bytes: int | None
    cost_per_gb: dict[str, float]
    capabilities: dict[str, Any] | None
    healthy: bool | None
    latency_seconds: float | None
    error: str | None


def _site_root(url: str) -> tuple[str, str]:
    """``(scheme, normalized root)`` comparable with a registration source."""
    parts = parse_url(url)
    if parts.scheme == "file":
        return "file", os.path.realpath(parts.path).rstrip("/") or "/"
    return parts.scheme, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


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
        scheme, root = _site_root(source)
    except DatasyncError:
        return None
    best: tuple[str, str] | None = None
    for name, site in sorted(settings.sites.items()):
        try:
            site_scheme, site_root = _site_root(site.url)
        except DatasyncError:
            continue
        if site_scheme != scheme:
            continue
        if root == site_root:
            rel = ""
        elif root.startswith(site_root.rstrip("/") + "/"):
            rel = root[len(site_root.rstrip("/")) + 1 :]
        else:
            continue
        # The deepest site root wins when site roots nest.
        if best is None or len(rel) < len(best[1]):
            best = (name, f"{rel}/" if rel else "")
    return best


def list_sites(settings: Settings, *, probe: bool = True, timeout: float = 5.0) -> list[SiteInfo]:
    """Configured sites with their capabilities and (``probe``) a cheap health check.

    Capabilities come from opening the backend (no network for any of ours). The probe
    lists at most one key under the site root. Each site runs in a daemon thread bounded
    by one overall ``timeout``, so a hung endpoint neither blocks the answer nor the exit
    of the process; a slow or failing site is reported, never raised.
    """
    results: dict[str, dict[str, Any]] = {name: {} for name in settings.sites}
    threads = [
        threading.Thread(
            target=_inspect,
            args=(site.url, site.options, probe, results[name]),
            name=f"datasync-probe-{name}",
            daemon=True,
        )
        for name, site in sorted(settings.sites.items())
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    infos: list[SiteInfo] = []
    for name, site in sorted(settings.sites.items()):
        found = results[name]
        error = found.get("error")
        if "error" not in found and ((probe and "latency" not in found) or "caps" not in found):
            error = f"no answer within {timeout:g}s"
        try:
            backend = parse_url(site.url).scheme
        except DatasyncError:
            backend = "?"
        infos.append(
            SiteInfo(
                name=name,
                url=redact(site.url),
                backend=backend,
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


def _inspect(url: str, options: dict[str, Any], probe: bool, out: dict[str, Any]) -> None:
    """Fill ``out`` with ``caps``, then ``latency`` (probe) or ``error``; never raises."""
    try:
        backend = open_backend(url, options)
    except Exception as exc:  # a broken SDK or config must not break `datasync sites`
        out["error"] = f"{type(exc).__name__}: {exc}"
        return
    try:
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
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            backend.close()
