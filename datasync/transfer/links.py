"""What the scheduler and the planner know about each link ``src -> dst``: its observed
throughput, its cost per GB, and whether it is penalized after failures.

Throughput is the scheduler's running average (``link_stats``); a link never measured
falls back to the sites' configured bandwidth (the smaller of the two), else
``DEFAULT_BYTES_PER_SECOND``. A copy inside one site costs nothing. Reads only: the state
owner writes ``link_stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.config import Settings
from datasync.db.ops_tables import LinkStat
from datasync.transfer.state import as_utc

__all__ = ["DEFAULT_BYTES_PER_SECOND", "Links", "load_links"]

# An assumption for links never measured and without a configured bandwidth: 100 MB/s.
DEFAULT_BYTES_PER_SECOND = 100e6


@dataclass(frozen=True, slots=True)
class Links:
    settings: Settings
    measured: dict[tuple[str, str], float]
    penalties: dict[tuple[str, str], datetime]

    def rate(self, src: str, dst: str) -> float:
        """Bytes per second to expect on ``src -> dst``."""
        found = self.measured.get((src, dst))
        if found:
            return found
        configured = [
            self.settings.sites[s].bandwidth_mbps
            for s in {src, dst}
            if s in self.settings.sites and self.settings.sites[s].bandwidth_mbps
        ]
        if configured:
            return min(c for c in configured if c is not None) * 1e6 / 8
        return DEFAULT_BYTES_PER_SECOND

    def cost(self, src: str, dst: str) -> float:
        """Configured cost per GB from ``src`` to ``dst``; a local copy is free, unknown is
        infinite (a last resort)."""
        if src == dst:
            return 0.0
        site = self.settings.sites.get(src)
        return math.inf if site is None else site.cost_per_gb.get(dst, math.inf)

    def penalized(self, src: str, dst: str, now: datetime) -> bool:
        until = self.penalties.get((src, dst))
        return until is not None and until > now


def load_links(engine: Engine, settings: Settings) -> Links:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                col(LinkStat.src_site),
                col(LinkStat.dst_site),
                col(LinkStat.bytes_per_second),
                col(LinkStat.penalty_until),
            )
        ).all()
    measured = {(s, d): float(r) for s, d, r, _p in rows if r}
    penalties = {(s, d): aware for s, d, _r, p in rows if (aware := as_utc(p)) is not None}
    return Links(settings, measured, penalties)
