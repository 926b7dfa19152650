"""Placement service functions: replicate, status, sites, source replicas.

One way in: the CLI (``datasync.cli_transfer``), the API (``datasync.api.transfer_routes``)
and the tests all call these.

* ``replicate(ref, site)`` records "version V must be at site S" and plans it. It is
  idempotent per ``(version, site)``: an existing placement is returned (with priority and
  deadline updated when given); a FAILED one, or one whose planner died (PLANNING and not
  touched for ``STALE_PLANNING``), is planned again. A placement with nothing missing still
  gets its ``publish`` task, so the view is published and READY follows at once.
* Source replicas: a version registered from a directory or URL that is (under) a
  configured site's root has its files at ``<relative root>/<path>`` there. Those files are
  recorded as replicas of that site (``record_source_replicas``), so the planner can read
  from them. A version registered from anywhere else cannot be replicated until it is
  (register it from inside a site).
* ``status`` reports progress, current throughput (bytes written by tasks finished in the
  last ``THROUGHPUT_WINDOW`` seconds; 0 once READY or FAILED), an ETA from the same window,
  whether a deadline is at risk, task counts and the newest errors.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from datasync.backends.registry import open_backend, parse_url, redact
from datasync.config import Settings
from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.tables import datasets_table, entries_table, versions_table
from datasync.db.transfer_tables import Placement, Replica, Task
from datasync.errors import DatasyncError, UserError
from datasync.manifest.store import ManifestStore
from datasync.transfer.planner import PlannerConfig, plan_placement
from datasync.transfer.taskqueue import as_utc

__all__ = [
    "STALE_PLANNING",
    "THROUGHPUT_WINDOW",
    "PlacementStatus",
    "SiteInfo",
    "list_sites",
    "parse_deadline",
    "record_source_replicas",
    "replan_stale",
    "replicate",
    "site_for_source",
    "status",
]

THROUGHPUT_WINDOW = 60.0
STALE_PLANNING = timedelta(minutes=5)
LAST_ERRORS = 5

_P: sa.Table = Placement.__table__  # type: ignore[attr-defined]
_R: sa.Table = Replica.__table__  # type: ignore[attr-defined]
_T: sa.Table = Task.__table__  # type: ignore[attr-defined]
_D, _V, _E = datasets_table, versions_table, entries_table


class PlacementStatus(BaseModel):
    id: int
    dataset: str
    version_id: str
    site: str
    state: str
    priority: int
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    throughput_bytes_per_second: float
    eta_seconds: float | None
    at_risk: bool
    tasks: dict[str, int]
    error: str | None
    last_errors: list[dict[str, Any]]

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version_id}"


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


# --------------------------------------------------------------------- source replicas


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


def record_source_replicas(
    engine: Engine, settings: Settings, version_pk: int, source: str
) -> tuple[str, int] | None:
    """Record every file of the version as a replica at the site holding ``source``.

    One ``INSERT ... SELECT`` (no Python-side rows). Existing rows are left alone, so a
    replica marked bad stays bad. Returns ``(site, rows inserted)`` or None if ``source``
    is not under a configured site.
    """
    found = site_for_source(settings, source)
    if found is None:
        return None
    site, prefix = found
    with write_transaction(engine) as conn:
        return site, _insert_source_rows(conn, site, prefix, version_pk)


def _insert_source_rows(conn: Connection, site: str, prefix: str, version_pk: int) -> int:
    now = datetime.now(UTC)
    key = _E.c.path if not prefix else sa.literal(prefix, sa.Text) + _E.c.path
    rows = sa.select(
        sa.literal(site, sa.String),
        _E.c.digest,
        _E.c.size,
        key,
        sa.literal("ok", sa.String),
        sa.literal(now, sa.DateTime(timezone=True)),
    ).where(_E.c.version_pk == version_pk)
    insert = postgresql.insert(_R) if is_postgresql(conn) else sqlite.insert(_R)
    stmt = insert.from_select(["site", "digest", "size", "key", "state", "verified_at"], rows)
    result = conn.execute(
        stmt.on_conflict_do_nothing(), execution_options={"preserve_rowcount": True}
    )
    return max(0, result.rowcount or 0)


# -------------------------------------------------------------------------- replicate


def parse_deadline(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """``+2h``/``+30m``/``+90s``/``+1d`` from now, or an ISO 8601 time (UTC if no zone)."""
    if text is None or text == "":
        return None
    now = now or datetime.now(UTC)
    if text.startswith("+"):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        number, unit = text[1:-1], text[-1:].lower()
        if unit not in units or not number.replace(".", "", 1).isdigit():
            raise UserError(f"bad deadline {text!r}: use +90s, +30m, +2h, +1d or ISO 8601")
        return now + timedelta(seconds=float(number) * units[unit])
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UserError(f"bad deadline {text!r}: use +2h or ISO 8601 ({exc})") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def replicate(
    engine: Engine,
    settings: Settings,
    ref: str,
    site: str,
    *,
    priority: int | None = None,
    deadline: datetime | None = None,
    planner: PlannerConfig | None = None,
    source: str | None = None,
) -> PlacementStatus:
    """Make sure version ``ref`` will be (or is) at ``site``; return its status.

    ``source`` (``SITE:prefix``, or a directory/URL under a site) says where the version's
    files are when its registration did not (a producer manifest); it is recorded as
    source replicas before planning.
    """
    if site not in settings.sites:
        known = ", ".join(sorted(settings.sites)) or "none configured"
        raise UserError(f"unknown site {site!r} (sites: {known})")
    if source is not None and site_for_source(settings, source) is None:
        raise UserError(
            f"--from {source!r} is not under any configured site: use SITE:prefix or a"
            " path/URL inside a site's root"
        )
    summary = ManifestStore(engine).resolve(ref)
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        version = conn.execute(
            sa.select(_V.c.pk, _V.c.source)
            .join(_D, _D.c.pk == _V.c.dataset_pk)
            .where(_D.c.name == summary.dataset, _V.c.version_id == summary.version_id)
        ).one()
        existing = conn.execute(
            sa.select(_P.c.id, _P.c.state, _P.c.updated_at).where(
                _P.c.version_pk == version.pk, _P.c.site == site
            )
        ).one_or_none()
        if existing is None:
            placement_id = _insert_placement(
                conn, version.pk, summary.dataset, summary.version_id, site, priority, deadline, now
            )
            must_plan = True
        else:
            placement_id = int(existing.id)
            _reprioritize(conn, placement_id, priority, deadline, now)
            must_plan = _take_for_planning(conn, placement_id, now)
        # An explicit --from is recorded even for a running placement: workers fall back
        # to any ok source, so it helps without a re-plan.
        for where in ((version.source,) if must_plan else ()) + ((source,) if source else ()):
            found = site_for_source(settings, where)
            if found is not None:
                _insert_source_rows(conn, found[0], found[1], version.pk)
    if must_plan:
        plan_placement(engine, settings, placement_id, planner)
    return status(engine, placement_id=placement_id)[0]


def _insert_placement(
    conn: Connection,
    version_pk: int,
    dataset: str,
    version_id: str,
    site: str,
    priority: int | None,
    deadline: datetime | None,
    now: datetime,
) -> int:
    values = {
        "dataset": dataset,
        "version_pk": version_pk,
        "version_id": version_id,
        "site": site,
        "priority": priority or 0,
        "deadline": deadline,
        "state": "PLANNING",
        "created_at": now,
        "updated_at": now,
        "files_total": 0,
        "bytes_total": 0,
        "files_done": 0,
        "bytes_done": 0,
    }
    # BEGIN IMMEDIATE (SQLite) / the unique constraint (PostgreSQL, under a savepoint)
    # make a concurrent replicate of the same (version, site) return the same row.
    try:
        with conn.begin_nested():
            return int(conn.execute(sa.insert(_P).values(values).returning(_P.c.id)).scalar_one())
    except sa.exc.IntegrityError:
        return int(
            conn.execute(
                sa.select(_P.c.id).where(_P.c.version_pk == version_pk, _P.c.site == site)
            ).scalar_one()
        )


def _reprioritize(
    conn: Connection,
    placement_id: int,
    priority: int | None,
    deadline: datetime | None,
    now: datetime,
) -> None:
    values: dict[str, Any] = {}
    if priority is not None:
        values["priority"] = priority
    if deadline is not None:
        values["deadline"] = deadline
    if not values:
        return
    # Tasks inherit both, so the queue reorders at once (retries never lose priority).
    # Tasks before the placement row: the lock order of every queue writer.
    conn.execute(
        sa.update(_T)
        .where(_T.c.placement_id == placement_id, _T.c.state.in_(("queued", "leased")))
        .values(**values)
    )
    conn.execute(sa.update(_P).where(_P.c.id == placement_id).values(updated_at=now, **values))


def _take_for_planning(
    conn: Connection, placement_id: int, now: datetime, stale: timedelta = STALE_PLANNING
) -> bool:
    """Move a FAILED, or stale PLANNING, placement to PLANNING; True if this caller did.

    Conditional update: of two callers racing to re-plan, exactly one wins and plans.
    """
    taken = conn.execute(
        sa.update(_P)
        .where(
            _P.c.id == placement_id,
            sa.or_(
                _P.c.state == "FAILED",
                sa.and_(_P.c.state == "PLANNING", _P.c.updated_at < now - stale),
            ),
        )
        .values(state="PLANNING", error=None, updated_at=now)
    )
    return taken.rowcount == 1


def replan_stale(
    engine: Engine, settings: Settings, *, older_than: timedelta = STALE_PLANNING
) -> int:
    """Plan again the placements whose planner died (PLANNING, untouched for a while)."""
    cutoff = datetime.now(UTC) - older_than
    with engine.connect() as conn:
        ids = list(
            conn.execute(
                sa.select(_P.c.id).where(_P.c.state == "PLANNING", _P.c.updated_at < cutoff)
            ).scalars()
        )
    planned = 0
    for placement_id in ids:
        with write_transaction(engine) as conn:
            mine = _take_for_planning(conn, int(placement_id), datetime.now(UTC), older_than)
        if mine:  # another scheduler may have taken it meanwhile
            plan_placement(engine, settings, int(placement_id))
            planned += 1
    return planned


# ----------------------------------------------------------------------------- status


def status(
    engine: Engine,
    *,
    placement_id: int | None = None,
    dataset: str | None = None,
    site: str | None = None,
    active_only: bool = False,
) -> list[PlacementStatus]:
    """Placements (newest first) with progress, throughput, ETA, task counts and errors."""
    query = sa.select(_P).order_by(_P.c.created_at.desc(), _P.c.id.desc())
    if placement_id is not None:
        query = query.where(_P.c.id == placement_id)
    if dataset is not None:
        query = query.where(_P.c.dataset == dataset)
    if site is not None:
        query = query.where(_P.c.site == site)
    if active_only:
        query = query.where(_P.c.state.not_in(("READY", "FAILED")))
    now = datetime.now(UTC)
    since = now - timedelta(seconds=THROUGHPUT_WINDOW)
    out: list[PlacementStatus] = []
    with engine.connect() as conn:
        for row in conn.execute(query).mappings().all():
            pid = int(row["id"])
            counts = {
                str(state): int(n)
                for state, n in conn.execute(
                    sa.select(_T.c.state, sa.func.count())
                    .where(_T.c.placement_id == pid)
                    .group_by(_T.c.state)
                )
            }
            moved, logical = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(_T.c.bytes_moved), 0),
                    sa.func.coalesce(sa.func.sum(_T.c.bytes), 0),
                ).where(_T.c.placement_id == pid, _T.c.state == "done", _T.c.finished_at >= since)
            ).one()
            # Over the last window, or since the placement began if that is shorter.
            age = (now - (as_utc(row["created_at"]) or now)).total_seconds()
            span = max(1.0, min(THROUGHPUT_WINDOW, age))
            final = row["state"] in ("READY", "FAILED")
            throughput = 0.0 if final else float(moved) / span
            rate = float(logical) / span
            remaining = int(row["bytes_total"]) - int(row["bytes_done"])
            eta: float | None = None
            if row["state"] == "READY":
                eta = 0.0
            elif not final and rate > 0:
                eta = remaining / rate
            deadline = as_utc(row["deadline"])
            at_risk = bool(
                deadline is not None
                and row["state"] not in ("READY", "FAILED")
                and (
                    deadline <= now or (eta is not None and now + timedelta(seconds=eta) > deadline)
                )
            )
            out.append(
                PlacementStatus(
                    id=pid,
                    dataset=row["dataset"],
                    version_id=row["version_id"],
                    site=row["site"],
                    state=row["state"],
                    priority=row["priority"],
                    deadline=deadline,
                    created_at=as_utc(row["created_at"]) or now,
                    updated_at=as_utc(row["updated_at"]) or now,
                    files_done=row["files_done"],
                    files_total=row["files_total"],
                    bytes_done=row["bytes_done"],
                    bytes_total=row["bytes_total"],
                    throughput_bytes_per_second=throughput,
                    eta_seconds=eta,
                    at_risk=at_risk,
                    tasks=counts,
                    error=row["error"],
                    last_errors=_last_errors(conn, pid),
                )
            )
    return out


def _last_errors(conn: Connection, placement_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(_T.c.id, _T.c.kind, _T.c.errors)
        .where(
            _T.c.placement_id == placement_id,
            sa.or_(
                _T.c.state == "failed",
                _T.c.attempts > 1,
                sa.and_(_T.c.state == "queued", _T.c.attempts > 0),
            ),
        )
        .order_by(_T.c.id.desc())
        .limit(50)
    ).all()
    errors = [
        {"task": int(task_id), "kind": kind, **entry}
        for task_id, kind, history in rows
        for entry in (history or [])[-LAST_ERRORS:]
        if entry.get("class") != "Cancelled"
    ]
    errors.sort(key=lambda e: str(e.get("at", "")), reverse=True)
    return errors[:LAST_ERRORS]


# ------------------------------------------------------------------------------ sites


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
