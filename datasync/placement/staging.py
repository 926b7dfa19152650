"""Stage requests: "version V at site S before my job starts", from job hooks.

A stage request is a placement made on a job's behalf (``origin="stage"``) plus a pin that
keeps the version at the site until the job releases it. Invariants:

* Idempotent per ``(job id, version, site)``: asking twice is one request and one pin.
* The placement's deadline is the earliest of its jobs' deadlines; the scheduler orders
  its tasks by slack from it.
* Data already resident returns at once (a view that is gone is re-planned, not trusted).
* ``wait`` polls the database (every process sees the same state) until the placement is
  READY (exit 0), FAILED or DAMAGED beyond repair (a permanent failure, with the reason),
  or the timeout (the request stays). While it waits with work queued and no task claimed
  for ``NO_WORKER_AFTER``, it says so plainly instead of waiting silently.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import col

from datasync.backends.base import SupportsLocalTree
from datasync.db.ops_tables import StageRequest
from datasync.db.transfer_tables import Placement, Task
from datasync.errors import UserError
from datasync.manifest.refs import parse_ref
from datasync.manifest.store import ManifestStore
from datasync.models import PlacementState, TaskState
from datasync.transfer.layout import view_prefix
from datasync.transfer.service import ReplicationService
from datasync.transfer.state import EngineState, as_utc
from datasync.transfer.status import NO_WORKER_AFTER, NO_WORKER_MESSAGE, PlacementStatus

__all__ = ["NO_WORKER_AFTER", "StageResult", "StageService", "Waited"]

_JOB_ID = re.compile(r"[A-Za-z0-9._:+=-]{1,200}")


class StageResult(BaseModel):
    request: int | None
    job_id: str | None
    ref: str
    site: str
    state: str
    path: str | None
    reason: str | None
    deadline: datetime | None
    eta_seconds: float | None
    at_risk: bool
    placement: int | None


class Waited(BaseModel):
    """How a wait ended: ``ready``, ``failed`` (permanent) or ``timeout``."""

    outcome: str
    result: StageResult


class StageService:
    """Built by ``bootstrap``; the ``stage``/``release`` commands and routes call it."""

    def __init__(
        self,
        replication: ReplicationService,
        state: EngineState,
        store: ManifestStore,
    ) -> None:
        self.replication = replication
        self.state = state
        self.store = store
        self.engine = replication.engine
        self.settings = replication.settings

    def stage(
        self,
        ref: str,
        site: str,
        *,
        deadline: datetime | None = None,
        job_id: str | None = None,
        dry_run: bool = False,
    ) -> StageResult:
        """Record (idempotently) that the job needs ``ref`` at ``site``; pin it there."""
        if site not in self.settings.sites:
            known = ", ".join(sorted(self.settings.sites)) or "none configured"
            raise UserError(f"unknown site {site!r} (sites: {known})")
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise UserError(f"bad job id {job_id!r}: 1 to 200 of letters, digits and . _ - : + =")
        version = self.store.resolve(ref)
        full = f"{version.dataset}@{version.version_id}"
        if dry_run:
            return StageResult(
                request=None,
                job_id=job_id,
                ref=full,
                site=site,
                state="VALID",
                path=None,
                reason=None,
                deadline=deadline,
                eta_seconds=None,
                at_risk=False,
                placement=None,
            )
        job = job_id or f"manual-{uuid.uuid4().hex[:12]}"
        placement = self.replication.replicate(full, site, deadline=deadline, origin="stage")
        request, _created = self.state.staging.request(job, placement.id, deadline)
        return self._result(request, job, self.replication.status(placement_id=placement.id)[0])

    def status(self, request_id: int) -> StageResult:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(col(StageRequest.job_id), col(StageRequest.placement_id)).where(
                    col(StageRequest.id) == request_id
                )
            ).one_or_none()
        if row is None:
            raise UserError(f"no stage request {request_id}")
        (st,) = self.replication.status(placement_id=row.placement_id)
        return self._result(request_id, str(row.job_id), st)

    def wait(
        self,
        result: StageResult,
        timeout: float | None,
        *,
        poll: float = 1.0,
        on_update: Callable[[StageResult, str | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Waited:
        """Poll until READY, a permanent failure, or ``timeout`` seconds (None: forever)."""
        if result.request is None or result.placement is None:
            raise UserError("nothing to wait for: a dry run records no request")
        placement = result.placement
        end = None if timeout is None else clock() + timeout
        while True:
            result = self.status(result.request)
            if result.state == PlacementState.READY:
                return Waited(outcome="ready", result=result)
            if result.state in (PlacementState.FAILED, PlacementState.EVICTED):
                return Waited(outcome="failed", result=result)
            if on_update is not None:
                on_update(result, self.idle_reason(placement))
            if end is not None and clock() >= end:
                return Waited(outcome="timeout", result=result)
            sleep(poll if end is None else max(0.0, min(poll, end - clock())))

    def release(self, job_id: str, ref: str | None = None, site: str | None = None) -> list[int]:
        """Drop the job's pins (all of them, or those of ``ref`` and/or ``site``)."""
        ids = None
        if ref is not None or site is not None:
            query = sa.select(col(Placement.id))
            if ref is not None:
                parsed = parse_ref(ref)
                version = self.store.resolve(ref) if "@" in ref else None
                query = query.where(col(Placement.dataset) == parsed.dataset)
                if version is not None:
                    query = query.where(col(Placement.version_id) == version.version_id)
            if site is not None:
                query = query.where(col(Placement.site) == site)
            with self.engine.connect() as conn:
                ids = [int(p) for p in conn.execute(query).scalars() if p is not None]
        return self.state.staging.release(job_id, ids)

    def idle_reason(self, placement_id: int) -> str | None:
        """Work is queued and no worker claimed any task lately: say so plainly."""
        since = datetime.now(UTC) - NO_WORKER_AFTER
        with self.engine.connect() as conn:
            queued = conn.execute(
                sa.select(sa.func.count()).where(
                    col(Task.placement_id) == placement_id,
                    col(Task.state) == TaskState.QUEUED,
                    col(Task.blocked_by) == 0,
                    col(Task.not_before) <= datetime.now(UTC),
                )
            ).scalar_one()
            if not queued:
                return None
            recent = conn.execute(sa.select(sa.func.max(col(Task.started_at)))).scalar_one()
        last = as_utc(recent)
        if last is not None and last >= since:
            return None
        return NO_WORKER_MESSAGE

    # -- helpers --------------------------------------------------------------------------

    def _result(self, request: int, job_id: str, st: PlacementStatus) -> StageResult:
        return StageResult(
            request=request,
            job_id=job_id,
            ref=f"{st.dataset}@{st.version_id}",
            site=st.site,
            state=st.state,
            path=self._path(st) if st.state == PlacementState.READY else None,
            reason=st.error,
            deadline=st.deadline,
            eta_seconds=st.eta_seconds,
            at_risk=st.at_risk,
            placement=st.id,
        )

    def _path(self, st: PlacementStatus) -> str:
        backend = self.replication.backends[st.site]
        prefix = view_prefix(st.dataset, st.version_id)
        if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
            return f"{backend.root}/{prefix}"
        return f"{backend.url.rstrip('/')}/{prefix}"
