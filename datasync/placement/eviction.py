"""Quotas and eviction: make room at a site by evicting least-recently-used unpinned views.

A site's usage is the size of the distinct blobs in its blob store (``quota_bytes`` in its
``[sites.NAME]`` table is its capacity). Invariants:

* Nothing pinned is evicted (invariant 8): a placement with a pin not past its expiry (a
  job's stage request, a policy's last N versions, an operator) is never a candidate.
* Least recently used first: by ``last_used_at`` (a job staged it, or it was published).
* Blobs are reference-counted across views: evicting a version frees only the blobs no
  other placement at the site still needs (any state but EVICTED).
* The order is: the placement becomes EVICTED (stage requests stop returning it), its labels
  at the site are removed, its view is unpublished (POSIX: the tree removed; object stores:
  the completion marker first, then the objects), and only then are its freed blobs deleted
  and forgotten. A crash in between leaves at worst a view or blobs the audit reports.
* A placement that cannot fit even after every eviction possible says so: it fails with the
  numbers (needed, quota, used, evictable, what is pinned), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.backends.base import Backend, SupportsLocalTree
from datasync.config import Settings
from datasync.db.ops_tables import Pin
from datasync.db.tables import Entry
from datasync.db.transfer_tables import Placement, Replica, Task
from datasync.errors import UserError
from datasync.models import PlacementState, ReplicaKind, ReplicaState, TaskState
from datasync.textfmt import human_bytes
from datasync.transfer.exec.context import SiteBackends
from datasync.transfer.labels import labels_at_site
from datasync.transfer.layout import COMPLETE_MARKER, blob_key, view_prefix
from datasync.transfer.state import EngineState, as_utc, row_id
from datasync.transfer.views import sync_labels

__all__ = ["Candidate", "Evictor", "GcPlan"]


@dataclass(frozen=True, slots=True)
class Candidate:
    placement_id: int
    ref: str
    last_used: datetime | None
    frees: int  # bytes of blobs no other placement at the site needs


@dataclass
class GcPlan:
    site: str
    quota: int | None
    used: int  # bytes in the blob store now
    pending: int  # bytes unfinished placements at the site will still add
    need: int  # bytes asked for on top (a placement being planned)
    evict: list[Candidate] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # refs kept by a pin
    orphans: int = 0  # bytes of blobs no placement needs at all
    done: bool = False  # executed (not a dry run)

    @property
    def frees(self) -> int:
        return sum(c.frees for c in self.evict) + self.orphans

    @property
    def fits(self) -> bool:
        if self.quota is None:
            return True
        return self.used + self.pending + self.need - self.frees <= self.quota

    def shortfall(self) -> str:
        assert self.quota is not None
        kept = ", ".join(self.pinned[:5]) or "none"
        return (
            f"site {self.site} cannot fit it: needs {human_bytes(self.need)} more, quota"
            f" {human_bytes(self.quota)}, used {human_bytes(self.used)} (+"
            f"{human_bytes(self.pending)} on the way), evictable {human_bytes(self.frees)};"
            f" pinned: {kept}. Release pins (`datasync release`), raise quota_bytes, or"
            f" `datasync gc {self.site}`"
        )


class Evictor:
    def __init__(
        self, engine: Engine, settings: Settings, state: EngineState, backends: SiteBackends
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = state
        self.backends = backends

    # -- reading ------------------------------------------------------------------------

    def usage(self, site: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(col(Replica.size)), 0)).where(
                        col(Replica.site) == site,
                        col(Replica.kind) == ReplicaKind.BLOB,
                        col(Replica.state) == ReplicaState.OK,
                    )
                ).scalar_one()
            )

    def plan(
        self, site: str, *, need: int = 0, keep: int | None = None, now: datetime | None = None
    ) -> GcPlan:
        """What ``gc`` would evict at ``site`` to fit ``need`` more bytes (and its orphans).
        ``keep``: a placement never to evict (the one asking for room)."""
        if site not in self.settings.sites:
            raise UserError(f"unknown site {site!r}")
        now = now or datetime.now(UTC)
        quota = self.settings.sites[site].quota_bytes
        plan = GcPlan(site, quota, self.usage(site), self._pending(site, keep), need)
        plan.orphans = sum(size for _d, size in self._orphans(site))
        pinned = self._pinned(site, now)
        for cand in self._lru(site, now):
            if cand.placement_id == keep:
                continue
            if cand.placement_id in pinned:
                plan.pinned.append(cand.ref)
                continue
            if plan.fits:
                break
            plan.evict.append(cand)
        return plan

    def make_room(self, site: str, need: int, placement_id: int) -> str | None:
        """Fit ``need`` more bytes at ``site`` for ``placement_id``: evict what must go.
        None when it fits (or the site has no quota), else why it cannot."""
        if self.settings.sites[site].quota_bytes is None:
            return None
        plan = self.plan(site, need=need, keep=placement_id)
        if not plan.fits:
            return plan.shortfall()
        if plan.evict:
            self.run(site, need=need, keep=placement_id)
        return None

    # -- doing --------------------------------------------------------------------------

    def run(
        self,
        site: str,
        *,
        need: int = 0,
        keep: int | None = None,
        dry_run: bool = False,
    ) -> GcPlan:
        plan = self.plan(site, need=need, keep=keep)
        if dry_run:
            return plan
        backend = self.backends[site]
        for cand in plan.evict:
            self._evict(backend, site, cand)
        orphans = self._orphans(site)
        self._delete_blobs(backend, site, [d for d, _size in orphans])
        plan.done = True
        return plan

    def _evict(self, backend: Backend, site: str, cand: Candidate) -> None:
        dataset, version_id = cand.ref.split("@", 1)
        freed = self._freed_by(site, cand.placement_id)
        if not self.state.staging.evicted(cand.placement_id, site, sum(s for _d, s in freed)):
            return  # no longer READY/DAMAGED: someone else moved it on
        sync_labels(backend, dataset, labels_at_site(self.engine, dataset, site))
        prefix = view_prefix(dataset, version_id)
        if backend.capabilities.local_tree and isinstance(backend, SupportsLocalTree):
            backend.remove_tree(prefix)
        else:
            backend.delete(f"{prefix}/{COMPLETE_MARKER}")  # unpublished first, then emptied
            for obj in list(backend.list(prefix + "/")):
                backend.delete(obj.key)
        self._delete_blobs(backend, site, [d for d, _s in freed])

    def _delete_blobs(self, backend: Backend, site: str, digests: list[str]) -> None:
        for digest in digests:
            backend.delete(blob_key(digest))  # idempotent: a missing blob is no error
        self.state.replicas.forget_blobs(site, digests)

    # -- queries ------------------------------------------------------------------------

    def _live(self, site: str) -> sa.Select[str]:
        """Digests some placement at ``site`` still needs (any state but EVICTED)."""
        return (
            sa.select(col(Entry.digest))
            .join(Placement, col(Placement.version_pk) == col(Entry.version_pk))
            .where(col(Placement.site) == site, col(Placement.state) != PlacementState.EVICTED)
        )

    def _blobs(self, site: str) -> sa.Select[str, int]:
        return sa.select(col(Replica.digest), col(Replica.size)).where(
            col(Replica.site) == site,
            col(Replica.kind) == ReplicaKind.BLOB,
            col(Replica.state) == ReplicaState.OK,
        )

    def _orphans(self, site: str) -> list[tuple[str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                self._blobs(site).where(col(Replica.digest).not_in(self._live(site)))
            ).all()
        return [(str(d), int(s)) for d, s in rows]

    def _freed_by(self, site: str, placement_id: int) -> list[tuple[str, int]]:
        """Blobs of the placement's version no OTHER live placement at the site needs."""
        mine = (
            sa.select(col(Entry.digest))
            .join(Placement, col(Placement.version_pk) == col(Entry.version_pk))
            .where(col(Placement.id) == placement_id)
        )
        others = self._live(site).where(col(Placement.id) != placement_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                self._blobs(site).where(
                    col(Replica.digest).in_(mine), col(Replica.digest).not_in(others)
                )
            ).all()
        return [(str(d), int(s)) for d, s in rows]

    def _lru(self, site: str, now: datetime) -> list[Candidate]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    col(Placement.id),
                    col(Placement.dataset),
                    col(Placement.version_id),
                    col(Placement.last_used_at),
                    col(Placement.updated_at),
                )
                .where(
                    col(Placement.site) == site,
                    col(Placement.state).in_((PlacementState.READY, PlacementState.DAMAGED)),
                )
                .order_by(
                    sa.func.coalesce(col(Placement.last_used_at), col(Placement.updated_at)),
                    col(Placement.id),
                )
            ).all()
        return [
            Candidate(
                placement_id=row_id(pid),
                ref=f"{ds}@{vid}",
                last_used=as_utc(used) or as_utc(updated),
                frees=sum(s for _d, s in self._freed_by(site, row_id(pid))),
            )
            for pid, ds, vid, used, updated in rows
        ]

    def _pinned(self, site: str, now: datetime) -> set[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(col(Pin.placement_id), col(Pin.expires_at))
                .join(Placement, col(Placement.id) == col(Pin.placement_id))
                .where(col(Placement.site) == site)
            ).all()
        return {
            int(pid) for pid, expires in rows if (until := as_utc(expires)) is None or until > now
        }

    def _pending(self, site: str, keep: int | None) -> int:
        """Bytes unfinished placements at the site will still move (``keep`` excluded)."""
        query = (
            sa.select(sa.func.coalesce(sa.func.sum(col(Task.move_bytes)), 0))
            .join(Placement, col(Placement.id) == col(Task.placement_id))
            .where(
                col(Placement.site) == site,
                col(Task.state).in_((TaskState.QUEUED, TaskState.LEASED)),
            )
        )
        if keep is not None:
            query = query.where(col(Placement.id) != keep)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
