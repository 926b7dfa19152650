"""Replication routes of the HTTP API: placements (replicate, status) and sites.

Thin, like the rest of ``/api/v1``: each route calls the same service function as the CLI
(``App.replication``). Errors are mapped by the app's ``DatasyncError``
handler (unknown version 404, bad input 400).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from datasync.bootstrap import App
from datasync.errors import UnknownReference
from datasync.placement.explain import Explanation
from datasync.transfer.sites import SiteInfo
from datasync.transfer.status import PlacementStatus, parse_deadline

__all__ = ["ReplicateRequest", "transfer_router"]


class ReplicateRequest(BaseModel):
    ref: str = Field(description="DATASET@REF to replicate.")
    site: str = Field(description="Destination site name.")
    priority: int | None = Field(default=None, description="Higher runs first (default 0).")
    deadline: str | None = Field(
        default=None, description="ISO 8601 time, or relative: +90s, +30m, +2h, +1d."
    )
    source: str | None = Field(
        default=None, description="Where the files are (SITE:prefix), if not where registered."
    )


def transfer_router(application: App, prefix: str = "/api/v1") -> APIRouter:
    """Routes over ``application``'s replication service."""
    replication = application.replication
    router = APIRouter(prefix=prefix, tags=["replication"])

    @router.post("/placements")
    def create_placement(body: ReplicateRequest) -> PlacementStatus:
        """Record (idempotently) that ``ref`` must be at ``site``, plan it, return status."""
        deadline: datetime | None = parse_deadline(body.deadline)
        return replication.replicate(
            body.ref,
            body.site,
            priority=body.priority,
            deadline=deadline,
            source=body.source,
        )

    @router.get("/placements")
    def list_placements(
        dataset: Annotated[str | None, Query()] = None,
        site: Annotated[str | None, Query()] = None,
        active: Annotated[bool, Query(description="Only placements not READY/FAILED.")] = False,
    ) -> list[PlacementStatus]:
        """Placements, newest first, with progress, throughput, ETA and last errors."""
        return replication.status(dataset=dataset, site=site, active_only=active)

    @router.get("/placements/{placement_id}")
    def get_placement(placement_id: int) -> PlacementStatus:
        rows = replication.status(placement_id=placement_id)
        if not rows:
            raise UnknownReference(f"no placement {placement_id}")
        return rows[0]

    @router.get("/placements/{placement_id}/explain")
    def explain_placement(placement_id: int) -> Explanation:
        """Why the placement is where it is: phases, queue position, blockers, errors."""
        return application.explainer.explain(placement_id)

    @router.get("/sites")
    def get_sites(
        probe: Annotated[bool, Query(description="Run a health probe per site.")] = False,
    ) -> list[SiteInfo]:
        """Configured sites with capabilities and (``probe=true``) health."""
        return replication.sites(probe=probe)

    return router
