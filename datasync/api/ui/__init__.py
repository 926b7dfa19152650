"""The built-in dashboard at ``/ui`` and the ``/metrics`` endpoint.

``/ui`` is one static page (``static/``: HTML, CSS and a dependency-free script, served
from the package, so it works with no network beyond this server). The script polls
``/ui/data`` every 2 s (``/ui?refresh=MS`` changes it) and draws:

* placements (unfinished ones, then the ``RECENT_FINISHED`` last finished) with progress
  bars, rate, ETA, deadline and what each is doing, from ``transfer.status``;
* throughput per link, from the event counters ``datasync_transfer_bytes_total{src,dst}``
  of this host's processes (the rates are taken between polls, in the browser);
* the queue by state and the workers' liveness, from the database (``observe.state``);
* recent errors (each placement's reason and its tasks' last errors);
* an explain panel per placement: ``GET /api/v1/placements/{id}/explain`` rendered field
  by field, or, where that answers 404, the placement's own status fields.

``/metrics`` is the Prometheus exposition (``observe.exposition``): every datasync process
of this host plus the database's state gauges.

Who may see what: the page and its assets are static and public; ``/ui/data`` names
datasets, paths and error messages, so it takes an ``ops`` or ``admin`` token (the page
asks for one and keeps it in the tab's ``sessionStorage``, sent as a bearer header).
``/metrics`` is public, as exporters are: its labels are sites, links, states and error
classes, never dataset names, paths or messages; restrict it by network as usual.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from datasync.api.auth import permit
from datasync.auth import Action
from datasync.bootstrap import App
from datasync.errors import UnknownReference
from datasync.observe import state
from datasync.observe.workers import db_now
from datasync.transfer.status import PlacementStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["RECENT_ERRORS", "RECENT_FINISHED", "dashboard_data", "ops_router"]

STATIC = Path(__file__).parent / "static"
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
RECENT_FINISHED = 10
RECENT_ERRORS = 20

_Finished = dict[int, tuple[datetime, PlacementStatus]]


def ops_router(application: App) -> APIRouter:
    """``/metrics``, ``/ui``, its assets and ``/ui/data`` over ``application``."""
    router = APIRouter(include_in_schema=False)
    exposition = application.observability.exposition(application.engine, application.settings)
    events = application.observability.exposition_events()
    finished: _Finished = {}  # final placements change rarely: keep their status

    @router.get("/metrics")
    def metrics(request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(exposition), media_type=content_type)

    @router.get("/ui")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @router.get("/ui/data", dependencies=[Depends(permit(Action.OBSERVE))])
    def data() -> dict[str, Any]:
        return dashboard_data(application, events, finished)

    @router.get("/ui/{asset}")
    def asset(asset: str) -> FileResponse:
        if asset not in _ASSETS:
            raise UnknownReference(f"no such dashboard file: {asset}")
        return FileResponse(STATIC / asset, media_type=_ASSETS[asset])

    return router


def dashboard_data(
    application: App, events: CollectorRegistry, finished: _Finished
) -> dict[str, Any]:
    """Everything the page draws, in one document."""
    replication = application.replication
    active = replication.status(active_only=True)
    with application.engine.connect() as conn:
        now = db_now(conn)
        queue = state.queue_depth(conn, now)
        hosts = state.workers_by_host(conn, now)
        recent = state.recent_finished(conn, RECENT_FINISHED)
    done: list[PlacementStatus] = []
    for pid, updated in recent:
        hit = finished.get(pid)
        if hit is None or hit[0] != updated:
            rows = replication.status(placement_id=pid)
            if not rows:
                continue
            hit = finished[pid] = (updated, rows[0])
        done.append(hit[1])
    for pid in set(finished) - {pid for pid, _ in recent}:
        del finished[pid]
    # A placement that finished between the two reads is in both: keep its final row.
    finished_ids = {p.id for p in done}
    placements = [*(p for p in active if p.id not in finished_ids), *done]
    return {
        "now": now.isoformat(),
        "placements": [p.model_dump(mode="json") for p in placements],
        "queue": queue.tasks,
        "oldest_waiting_seconds": queue.oldest_waiting_seconds,
        "workers": {
            "live": sum(h.live for h in hosts.values()),
            "stale": sum(h.stale for h in hosts.values()),
            "hosts": {name: _host(h) for name, h in hosts.items()},
        },
        "links": _links(events),
        "errors": _errors(placements),
    }


def _host(h: state.WorkerHost) -> dict[str, Any]:
    return {
        "live": h.live,
        "stale": h.stale,
        "heartbeat_age_seconds": h.heartbeat_age_seconds,
        "tasks_running": h.tasks_running,
    }


def _links(events: CollectorRegistry) -> list[dict[str, Any]]:
    links: dict[tuple[str, str], dict[str, Any]] = {}
    wanted = {"datasync_transfer_bytes_total": "bytes", "datasync_transfer_files_total": "files"}
    for family in events.collect():
        for sample in family.samples:
            field = wanted.get(sample.name)
            if field is None:
                continue
            key = (sample.labels.get("src", "?"), sample.labels.get("dst", "?"))
            entry = links.setdefault(key, {"src": key[0], "dst": key[1], "bytes": 0, "files": 0})
            entry[field] += int(sample.value)
    return sorted(links.values(), key=lambda link: (link["src"], link["dst"]))


def _errors(placements: list[PlacementStatus]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in placements:
        where = {"placement": p.id, "ref": f"{p.dataset}@{p.version_id[:12]}", "site": p.site}
        if p.error:
            at = p.updated_at.isoformat()
            out.append({**where, "at": at, "class": None, "message": p.error, "task": None})
        for e in p.last_errors:
            out.append(
                {
                    **where,
                    "at": e.get("at"),
                    "class": e.get("class"),
                    "message": e.get("message"),
                    "task": e.get("task"),
                    "kind": e.get("kind"),
                }
            )
    out.sort(key=lambda e: str(e["at"] or ""), reverse=True)
    return out[:RECENT_ERRORS]
