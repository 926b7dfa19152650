"""Job-facing routes: stage requests and their release (the same service as ``datasync stage``).

``POST /stage`` records (idempotently) and returns at once; hooks poll ``GET /stage/{id}``
until ``state`` is READY (``path`` is the view) or FAILED (``reason``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from datasync.api.auth import ReadPlacements, Stage
from datasync.api.errors import AUTH_RESPONSES
from datasync.api.params import ID_MAX
from datasync.auth.roles import Action
from datasync.bootstrap import App
from datasync.placement.staging import StageResult
from datasync.transfer.status import parse_deadline

__all__ = ["StageRequestBody", "staging_router"]


class StageRequestBody(BaseModel):
    ref: str = Field(description="DATASET@REF the job needs.")
    site: str = Field(description="The site the job runs at.")
    deadline: str | None = Field(
        default=None, description="When the job starts: ISO 8601, or +90s/+30m/+2h/+1d."
    )
    job_id: str | None = Field(default=None, description="Requests are idempotent per job.")
    dry_run: bool = Field(
        default=False,
        description="Check ref, site, deadline and job id; record nothing (state VALID).",
    )


class ReleaseBody(BaseModel):
    job_id: str
    ref: str | None = None
    site: str | None = None


class Released(BaseModel):
    job_id: str
    released: list[int]


def staging_router(application: App, prefix: str = "/api/v1") -> APIRouter:
    staging = application.staging
    router = APIRouter(prefix=prefix, tags=["staging"], responses=AUTH_RESPONSES)

    @router.post("/stage")
    def create_stage_request(body: StageRequestBody, who: Stage) -> StageResult:
        """Make sure ``ref`` is (or will be) at ``site`` for the job, and pin it there."""
        return staging.stage(
            body.ref,
            body.site,
            deadline=parse_deadline(body.deadline),
            job_id=body.job_id,
            dry_run=body.dry_run,
        )

    # :int, so /stage/release is not a request id (405s name only the right methods)
    @router.get("/stage/{request_id:int}")
    def get_stage_request(
        request_id: Annotated[int, Path(ge=1, le=ID_MAX)], who: ReadPlacements
    ) -> StageResult:
        result = staging.status(request_id)
        who.require(Action.READ_PLACEMENTS, result.ref.split("@", 1)[0])
        return result

    @router.post("/stage/release")
    def release_stage_requests(body: ReleaseBody, who: Stage) -> Released:
        """Drop the job's pins (all, or those of ``ref`` and/or ``site``)."""
        return Released(
            job_id=body.job_id, released=staging.release(body.job_id, body.ref, body.site)
        )

    return router
