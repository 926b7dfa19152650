"""The replication service: the operations the CLI, the HTTP API and the tests call.

``replicate`` records "version V must be at site S" (idempotently) and plans it; workers
move the bytes. ``status`` and ``sites`` report. ``replan_stale`` is the maintenance
chore that re-plans placements whose planner died. Every write goes through the state
owner; every check of the input happens before the first write (a priority outside
``PRIORITIES``, an unknown site, a malformed dataset name, a bad probe timeout are
``UserError``s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.config import SITE_NAME_RE, Settings
from datasync.db.tables import Dataset, Version
from datasync.db.transfer_tables import Placement
from datasync.errors import UnknownReference, UserError
from datasync.events import Event, LabelMoved, VersionRegistered
from datasync.manifest.refs import check_dataset_name
from datasync.manifest.store import ManifestStore
from datasync.models import PlacementState
from datasync.transfer.exec.context import SiteBackends
from datasync.transfer.labels import sites_showing
from datasync.transfer.payloads import LabelsPayload
from datasync.transfer.planner import Planner, PlannerConfig
from datasync.transfer.sites import SiteInfo, list_sites, site_for_source
from datasync.transfer.state import EngineState, Pause, row_id
from datasync.transfer.status import PlacementStatus, placement_id_of, status
from datasync.transfer.views import view_present

__all__ = ["PRIORITIES", "STALE_PLANNING", "ReplicationService"]

STALE_PLANNING = timedelta(minutes=5)
# Placement priorities: far inside the database's 32-bit integers, with room for the
# scheduler's boosts of placements at risk.
PRIORITIES = range(-1_000_000, 1_000_001)


class ReplicationService:
    """Placements and sites. Built once by ``datasync.bootstrap``."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: ManifestStore,
        state: EngineState,
        planner: Planner,
        backends: SiteBackends,
        reschedule: Callable[[], object],
        make_room: Callable[[str, int, int], str | None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.state = state
        self.planner = planner
        self.backends = backends
        # The scheduler's tick: new tasks get their deadline slack before any worker claims.
        self.reschedule = reschedule
        # (site, bytes needed, placement) -> None when it fits (after evicting what must go),
        # else the reason it cannot: the site's quota is enforced at planning time.
        self.make_room = make_room

    def replicate(
        self,
        ref: str,
        site: str,
        *,
        priority: int | None = None,
        deadline: datetime | None = None,
        source: str | None = None,
        planner: PlannerConfig | None = None,
        origin: str = "operator",
    ) -> PlacementStatus:
        """Make sure version ``ref`` will be (or is) at ``site``; return its status.

        ``source`` (``SITE:prefix``, or a directory/URL under a site) says where the
        version's files are when its registration did not (a producer manifest), or that
        files found bad there are right again: they are recorded (or refreshed) as source
        replicas before planning.
        """
        self._check_site(site)
        if priority is not None and priority not in PRIORITIES:
            raise UserError(
                f"priority {priority} is out of range: use {PRIORITIES.start} to"
                f" {PRIORITIES.stop - 1} (higher runs first, default 0)"
            )
        named = None
        if source is not None:
            named = site_for_source(self.settings, source)
            if named is None:
                raise UserError(
                    f"--from {source!r} is not under any configured site: use SITE:prefix or"
                    " a path/URL inside a site's root"
                )
        summary = self.store.resolve(ref)
        with self.engine.connect() as conn:
            version = conn.execute(
                sa.select(col(Version.pk), col(Version.source))
                .join(Dataset, col(Dataset.pk) == col(Version.dataset_pk))
                .where(
                    col(Dataset.name) == summary.dataset,
                    col(Version.version_id) == summary.version_id,
                )
            ).one()
        placement_id, created = self.state.placements.ensure(
            version_pk=version.pk,
            dataset=summary.dataset,
            version_id=summary.version_id,
            site=site,
            priority=priority,
            deadline=deadline,
            origin=origin,
            merge=origin != "operator",
        )
        if not created:
            self._check_ready_view(placement_id, summary.dataset, summary.version_id, site)
        must_plan = created or self.state.placements.reopen(
            placement_id, stale_after=STALE_PLANNING
        )
        # The registration source is recorded when planning; an explicit --from always (it
        # refreshes rows found bad: workers fall back to any usable source, no re-plan).
        registered = site_for_source(self.settings, version.source) if must_plan else None
        for found, refresh in ((registered, False), (named, True)):
            if found is not None:
                self.state.replicas.record_sources(found[0], found[1], version.pk, refresh=refresh)
        if must_plan:
            self._plan(placement_id, planner)
        return self.status(placement_id=placement_id)[0]

    def _check_site(self, site: str) -> None:
        if site not in self.settings.sites:
            known = ", ".join(sorted(self.settings.sites)) or "none configured"
            raise UserError(f"unknown site {site!r} (sites: {known})")

    def _plan(self, placement_id: int, config: PlannerConfig | None = None) -> None:
        result = self.planner.plan(placement_id, config)
        if result.state == PlacementState.TRANSFERRING and result.bytes_to_move:
            (st,) = self.status(placement_id=placement_id)
            short = self.make_room(st.site, result.bytes_to_move, placement_id)
            if short is not None:
                self.state.placements.fail(placement_id, short)
        self.reschedule()

    def settle_shared(self) -> int:
        """Plan again the placements that waited for a blob another placement's task was
        moving, when that task ended without it (a worker chore)."""
        replan = self.state.sharing.settle_orphans()
        for placement_id in replan:
            self._plan(placement_id)
        return len(replan)

    def _check_ready_view(
        self, placement_id: int, dataset: str, version_id: str, site: str
    ) -> None:
        """A READY placement whose view is gone from the site (deleted by hand, a store that
        lost it) is DAMAGED, so this replicate re-plans it instead of doing nothing."""
        (st,) = self.status(placement_id=placement_id)
        if st.state is not PlacementState.READY:
            return
        if not view_present(self.backends[site], dataset, version_id):
            where = f"{dataset}@{version_id[:12]} at {site}"
            self.state.placements.damage(placement_id, f"the view of {where} is missing")

    def status(
        self,
        *,
        placement_id: int | None = None,
        dataset: str | None = None,
        site: str | None = None,
        active_only: bool = False,
    ) -> list[PlacementStatus]:
        """Placements (of ``dataset``, at ``site``). A malformed dataset name, and a site
        neither configured nor holding placements (a typo), are refused, not "none found"."""
        if dataset is not None:
            check_dataset_name(dataset)
        if site is not None and site not in self.settings.sites:
            self._check_filters(site)
        return status(
            self.engine,
            placement_id=placement_id,
            dataset=dataset,
            site=site,
            active_only=active_only,
        )

    def _check_filters(self, site: str) -> None:
        if not SITE_NAME_RE.fullmatch(site):  # no site was ever called that
            self._check_site(site)
        with self.engine.connect() as conn:
            held = conn.execute(
                sa.select(col(Placement.id)).where(col(Placement.site) == site).limit(1)
            ).first()
        if held is None:
            self._check_site(site)

    def sites(self, *, probe: bool = True, timeout: float = 5.0) -> list[SiteInfo]:
        if not (math.isfinite(timeout) and timeout > 0):
            raise UserError(f"timeout {timeout:g}: give a number of seconds above 0")
        infos = list_sites(self.settings, probe=probe, timeout=timeout)
        paused = self.state.pauses.active(datetime.now(UTC))
        return [
            info.model_copy(update={"paused_until": p.until, "pause_reason": p.reason})
            if (p := paused.get(info.name))
            else info
            for info in infos
        ]

    # -- operator actions (role ops) --------------------------------------------------------

    def pause_site(self, site: str, until: datetime, reason: str, by: str) -> Pause:
        """Hold every task of ``site`` (as source or destination) until ``until``."""
        self._check_site(site)
        reason = " ".join(reason.split())
        if not reason:
            raise UserError("say why the site is paused (--reason): others will read it")
        if until <= datetime.now(UTC):
            raise UserError(f"pause until {until.isoformat()}: that is not in the future")
        return self.state.pauses.pause(site, until, reason, by)

    def resume_site(self, site: str, by: str) -> bool:
        """Lift an operator's pause of ``site``; False when it was not paused."""
        self._check_site(site)
        return self.state.pauses.resume(site, by)

    def placement_of(self, ref: str, site: str) -> int:
        """The id of version ``ref``'s placement at ``site`` (``UnknownReference`` if none)."""
        self._check_site(site)
        return placement_id_of(self.engine, self.store.resolve(ref), site, ref)

    def retry(self, placement_id: int) -> PlacementStatus:
        """Try a placement again now: a FAILED or DAMAGED one is planned anew (its reason
        stays in its history); the backing-off tasks of one in progress become due now."""
        found = self.status(placement_id=placement_id)
        if not found:
            raise UnknownReference(f"no placement #{placement_id}")
        st = found[0]
        if st.state in (PlacementState.FAILED, PlacementState.DAMAGED):
            return self.replicate(f"{st.dataset}@{st.version_id}", st.site)
        self.state.tasks.retry_now(placement_id)
        return self.status(placement_id=placement_id)[0]

    def on_event(self, event: Event) -> None:
        """Reactions to the manifest side (subscribed in ``bootstrap``): a registration that
        hashed files under a site makes them good sources again (bad is not forever), and
        labels that moved (``latest`` moves on each new version) follow at every site."""
        if isinstance(event, VersionRegistered):
            if event.verified:
                self._refresh_sources(event.dataset, event.version_id, event.source)
            self.follow_labels(event.dataset)
        elif isinstance(event, LabelMoved):
            self.follow_labels(event.dataset)

    def follow_labels(self, dataset: str) -> int:
        """File a ``labels`` task for every site showing a view of ``dataset``."""
        filed = 0
        for site, placement_id in sites_showing(self.engine, dataset).items():
            filed += self.state.tasks.enqueue(placement_id, LabelsPayload(site, dataset))
        return filed

    def _refresh_sources(self, dataset: str, version_id: str, source: str) -> None:
        found = site_for_source(self.settings, source)
        if found is None:
            return
        with self.engine.connect() as conn:
            pk = conn.execute(
                sa.select(col(Version.pk))
                .join(Dataset, col(Dataset.pk) == col(Version.dataset_pk))
                .where(col(Dataset.name) == dataset, col(Version.version_id) == version_id)
            ).scalar_one()
        self.state.replicas.record_sources(found[0], found[1], row_id(pk), refresh=True)

    def repair(self, placement_id: int, reason: str) -> bool:
        """Re-plan a placement whose blobs were found missing or damaged at its site (they
        were marked bad): the missing ones move again, then the view is published anew."""
        if not self.state.placements.reopen_for_repair(placement_id, reason):
            return False
        self._plan(placement_id)
        return True

    def replan_stale(self, *, older_than: timedelta = STALE_PLANNING) -> int:
        """Plan again the placements whose planner died (PLANNING, untouched for a while)."""
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    sa.select(col(Placement.id)).where(
                        col(Placement.state) == PlacementState.PLANNING
                    )
                ).scalars()
            )
        planned = 0
        for placement_id in ids:
            if placement_id is not None and self.state.placements.reopen(
                placement_id, stale_after=older_than
            ):
                self._plan(placement_id)
                planned += 1
        return planned
