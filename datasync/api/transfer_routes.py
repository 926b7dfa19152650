"""Replication routes of the HTTP API: placements (replicate, status) and sites.

Thin, like the rest of ``/api/v1``: each route calls the same service function as the CLI
(``App.replication``). Errors are mapped by the app's ``DatasyncError``
handler (unknown version 404, bad input 400). Each route declares its action
(``datasync.api.auth``): replicating is ``admin``'s; an ``owner`` reads the placements
of its namespaces only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from datasync.api.auth import Operate, ReadPlacements, permit
from datasync.api.errors import AUTH_RESPONSES
from datasync.api.params import (
    ID_MAX,
    REF_EXAMPLE,
    REF_PATTERN,
    SITE_PATTERN,
    documented,
)
from datasync.auth.roles import Action
from datasync.bootstrap import App
from datasync.errors import UnknownReference, UserError
from datasync.placement.explain import Explanation
from datasync.transfer.sites import SiteInfo
from datasync.transfer.status import PlacementStatus, parse_deadline

__all__ = ["ReplicateRequest", "transfer_router"]

# The database column is 32-bit: refuse more as bad input.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


class ReplicateRequest(BaseModel):
    ref: str = Field(
        description="DATASET@REF to replicate.",
        json_schema_extra=documented(REF_PATTERN, REF_EXAMPLE),
    )
    site: str = Field(
        description="Destination site name.", json_schema_extra=documented(SITE_PATTERN)
    )
    priority: int | None = Field(
        default=None, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Higher runs first (default 0)."
    )
    deadline: str | None = Field(
        default=None, description="ISO 8601 time, or relative: +90s, +30m, +2h, +1d."
    )
    source: str | None = Field(
        default=None, description="Where the files are (SITE:prefix), if not where registered."
    )


SitePath = Annotated[
    str, Path(description="A configured site.", json_schema_extra=documented(SITE_PATTERN))
]


class PauseRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="Why: others will read it.")
    until: str = Field(
        default="+1h",
        min_length=1,
        max_length=64,
        description="When the pause ends: ISO 8601, or +90s, +30m, +2h, +1d.",
    )


class PauseInfo(BaseModel):
    site: str
    until: datetime
    reason: str
    by: str


class ResumeInfo(BaseModel):
    site: str
    resumed: bool = Field(description="False when the site was not paused.")


def _deadline(text: str | None) -> datetime | None:
    """``parse_deadline``, in UTC, refusing times past what a database can hand back (a
    deadline of 9999-12-31T23:59-05:00 is year 10000 in UTC: PostgreSQL stores it, and
    then no placement could be read)."""
    try:
        deadline = parse_deadline(text)
        return deadline.astimezone(UTC) if deadline is not None else None
    except OverflowError:
        raise UserError(f"deadline {text!r} is out of range") from None


def transfer_router(application: App, prefix: str = "/api/v1") -> APIRouter:
    """Routes over ``application``'s replication service."""
    replication = application.replication
    router = APIRouter(prefix=prefix, tags=["replication"], responses=AUTH_RESPONSES)

    @router.post("/placements", dependencies=[Depends(permit(Action.WRITE_PLACEMENTS))])
    def create_placement(body: ReplicateRequest) -> PlacementStatus:
        """Record (idempotently) that ``ref`` must be at ``site``, plan it, return status."""
        deadline = _deadline(body.deadline)
        return replication.replicate(
            body.ref,
            body.site,
            priority=body.priority,
            deadline=deadline,
            source=body.source,
        )

    @router.get("/placements")
    def list_placements(
        who: ReadPlacements,
        dataset: Annotated[str | None, Query(description="Only this dataset's.")] = None,
        site: Annotated[str | None, Query(description="Only those at this site.")] = None,
        active: Annotated[bool, Query(description="Only placements not READY/FAILED.")] = False,
    ) -> list[PlacementStatus]:
        """Placements, newest first, with progress, throughput, ETA and last errors (an
        owner token sees those of its namespaces)."""
        if dataset is not None:
            who.require(Action.READ_PLACEMENTS, dataset)
        rows = replication.status(dataset=dataset, site=site, active_only=active)
        return [p for p in rows if who.sees(p.dataset)]

    @router.get("/placements/{placement_id}")
    def get_placement(
        placement_id: Annotated[int, Path(ge=1, le=ID_MAX)], who: ReadPlacements
    ) -> PlacementStatus:
        rows = replication.status(placement_id=placement_id)
        if not rows:
            raise UnknownReference(f"no placement {placement_id}")
        who.require(Action.READ_PLACEMENTS, rows[0].dataset)
        return rows[0]

    @router.get("/placements/{placement_id}/explain")
    def explain_placement(
        placement_id: Annotated[int, Path(ge=1, le=ID_MAX)], who: ReadPlacements
    ) -> Explanation:
        """Why the placement is where it is: phases, queue position, blockers, errors."""
        rows = replication.status(placement_id=placement_id)
        if not rows:
            raise UnknownReference(f"no placement {placement_id}")
        who.require(Action.READ_PLACEMENTS, rows[0].dataset)
        return application.explainer.explain(placement_id)

    @router.get("/sites", dependencies=[Depends(permit(Action.READ_SITES))])
    def get_sites(
        probe: Annotated[bool, Query(description="Run a health probe per site.")] = False,
    ) -> list[SiteInfo]:
        """Configured sites with capabilities and (``probe=true``) health."""
        return replication.sites(probe=probe)

    # -- operator actions (ops, admin) ------------------------------------------------------

    @router.post("/placements/{placement_id}/retry", dependencies=[Depends(permit(Action.OPERATE))])
    def retry_placement(placement_id: Annotated[int, Path(ge=1, le=ID_MAX)]) -> PlacementStatus:
        """Try again now: a FAILED or DAMAGED placement is planned anew; the tasks of one in
        progress that are backing off after errors become due now."""
        return replication.retry(placement_id)

    @router.post("/sites/{site}/pause")
    def pause_site(site: SitePath, body: PauseRequest, who: Operate) -> PauseInfo:
        """Claim no task reading from or writing to ``site`` until ``until`` (running ones
        finish); a new pause replaces the old one."""
        until = _deadline(body.until)
        if until is None:
            raise UserError("give the pause an end: until=+2h or an ISO 8601 time")
        pause = replication.pause_site(site, until, body.reason, who.name)
        return PauseInfo(site=pause.site, until=pause.until, reason=pause.reason, by=pause.by)

    @router.post("/sites/{site}/resume")
    def resume_site(site: SitePath, who: Operate) -> ResumeInfo:
        """Lift the pause of ``site``: its tasks are claimed again at once."""
        return ResumeInfo(site=site, resumed=replication.resume_site(site, who.name))

    return router
