"""Operator pauses of a site (``datasync pause``/``resume``, ``POST /sites/{site}/pause``).

A pause is one row of ``site_pauses``; the claim statement skips every queued or expired
task that reads from or writes to a paused site until the pause ends or is lifted, so new
tasks planned meanwhile wait too, and a resume takes effect at the next claim. Tasks
already running finish. Attempts are not counted: a pause is not a failure. (A site whose
health probe fails is held differently, per task: ``TaskStates.pause_site``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import col

from datasync.db.transfer_tables import SitePause
from datasync.events import SiteHeld, SiteResumed
from datasync.transfer.state._core import StateBase, as_utc

__all__ = ["Pause", "SitePauses", "active_pauses"]

MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Pause:
    site: str
    until: datetime
    reason: str
    by: str


def active_pauses(conn: Connection, now: datetime) -> dict[str, Pause]:
    """Pauses in force at ``now``, by site (the one reader: status, sites, metrics)."""
    rows = conn.execute(sa.select(SitePause).where(col(SitePause.until) > now)).all()
    return {r.site: Pause(r.site, as_utc(r.until) or now, r.reason, r.paused_by) for r in rows}


class SitePauses(StateBase):
    """Owner of ``site_pauses``."""

    def pause(self, site: str, until: datetime, reason: str, by: str) -> Pause:
        """Pause ``site`` until ``until`` (a later pause replaces an earlier one)."""
        with self._write() as txn:
            txn.conn.execute(sa.delete(SitePause).where(col(SitePause.site) == site))
            txn.conn.execute(
                sa.insert(SitePause).values(
                    site=site,
                    until=until,
                    reason=reason[:MAX_REASON],
                    paused_by=by,
                    created_at=txn.now,
                )
            )
            txn.emit(SiteHeld(site=site, until=until, reason=reason[:MAX_REASON], by=by))
        return Pause(site, until, reason[:MAX_REASON], by)

    def resume(self, site: str, by: str) -> bool:
        """Lift ``site``'s pause; False if it had none in force."""
        with self._write() as txn:
            until = txn.conn.execute(
                sa.delete(SitePause)
                .where(col(SitePause.site) == site)
                .returning(col(SitePause.until))
            ).scalar_one_or_none()
            lifted = until is not None and (as_utc(until) or txn.now) > txn.now
            if lifted:
                txn.emit(SiteResumed(site=site, by=by))
                txn.tasks_ready()  # its tasks are claimable again: wake idle workers
        return lifted

    def active(self, now: datetime) -> dict[str, Pause]:
        """Pauses in force at ``now``, by site."""
        with self.engine.connect() as conn:
            return active_pauses(conn, now)
