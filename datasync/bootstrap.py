"""The one composition root: settings -> database -> state owner -> services -> worker parts.

Nothing in datasync connects, reads the environment or opens files at import time;
everything is built here, once per process, and torn down by ``App.close``. The CLI, the
HTTP API, the worker processes and the tests all start from ``bootstrap``. Constructors
below take their collaborators as required arguments; only this module chooses them.

Event subscribers (metrics, logs, the dashboard) are registered on ``App.bus`` here.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, replace
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from datasync.auth.tokens import TokenService
from datasync.backends.base import Backend
from datasync.backends.retrying import RetryingBackend
from datasync.config import Settings, load_settings
from datasync.db.engine import create_engine
from datasync.errors import ConfigError, TransientError
from datasync.events import EventBus
from datasync.integrity.audit import Auditor
from datasync.integrity.verify import Verifier
from datasync.manifest.remote import RemoteSources
from datasync.manifest.statcache import StatCache
from datasync.manifest.store import ManifestStore
from datasync.observe import Observability, build_observability
from datasync.observe.workers import WorkerLiveness
from datasync.placement.eviction import Evictor
from datasync.placement.explain import Explainer
from datasync.placement.policies import PolicyEngine
from datasync.placement.schedule import Scheduler
from datasync.placement.staging import StageService
from datasync.retry import Backoff, RetryPolicy
from datasync.service import DatasyncService
from datasync.transfer.buffers import BufferPool
from datasync.transfer.exec import ExecContext, Executor, SiteBackends
from datasync.transfer.limits import limits_from_settings
from datasync.transfer.planner import Planner
from datasync.transfer.service import ReplicationService
from datasync.transfer.siteindex import SiteIndex
from datasync.transfer.sites import SiteHealth
from datasync.transfer.state import EngineState, TaskStates
from datasync.transfer.worker import MIB, WorkerLoop, WorkerOptions, WorkerParts

__all__ = ["App", "bootstrap"]


@dataclass
class App:
    """Everything a process needs, wired together."""

    settings: Settings
    engine: Engine
    bus: EventBus
    store: ManifestStore
    stat_cache: StatCache
    service: DatasyncService
    state: EngineState
    planner: Planner
    replication: ReplicationService
    scheduler: Scheduler
    staging: StageService
    explainer: Explainer
    evictor: Evictor
    policies: PolicyEngine
    retry: RetryPolicy
    backends: SiteBackends  # this process's own (services); workers open their own
    verifier: Verifier
    observability: Observability  # metrics, event logs, the lookups they share
    tokens: TokenService  # API tokens (hashed) and the embedded admin token
    auditor: Auditor

    def worker(self, options: WorkerOptions) -> WorkerLoop:
        """A worker loop for this process: backends, host-wide limits, buffers, I/O pool."""
        settings = self.settings
        chunk = max(settings.chunk_size, MIB)
        limits = limits_from_settings(settings.home, settings.sites)
        space = options.space_backoff_base
        policy = replace(
            self.retry,
            task_backoff=Backoff(options.queue_backoff_base, 300.0),
            space_backoff=replace(
                self.retry.space_backoff,
                initial=15 * options.queue_backoff_base if space is None else space,
            ),
        )

        tasks = TaskStates(self.engine, self.bus, policy, settings.link_caps())
        # A site found down holds its tasks instead of letting them fail (every worker);
        # a call retried after a network error makes its site a suspect at once.
        health = SiteHealth(settings, self.engine, tasks.pause_site)
        self.bus.subscribe(health.on_event)

        def with_retries(site: str, backend: Backend) -> Backend:
            # Throttling feeds the site's host-wide AIMD limit; every retry is the policy's.
            return RetryingBackend(
                backend,
                policy,
                on_throttled=lambda exc: limits.on_throttled(site, exc.retry_after),
                on_success=lambda: limits.on_success(site),
                on_retry=lambda event: (
                    health.suspect(site) if isinstance(event.error, TransientError) else None
                ),
            )

        backends = SiteBackends(settings.sites, wrap=with_retries)
        io = cf.ThreadPoolExecutor(options.io_threads, thread_name_prefix="datasync-io")
        ctx = ExecContext(
            state=self.state,
            index=SiteIndex(self.engine),
            manifests=self.store,
            backends=backends,
            limits=limits,
            buffers=BufferPool(max(options.buffer_budget, 2 * chunk)),
            io=io,
        )
        parts = WorkerParts(
            engine=self.engine,
            tasks=tasks,
            executor=Executor(ctx),
            replan=self.replication.repair,
            chores=(
                tasks.reap,
                self.scheduler.tick,
                self.replication.settle_shared,
                health.check,
            ),
            liveness=WorkerLiveness(self.engine),
            warm=backends.warm,
            closers=(lambda: io.shutdown(wait=True), backends.close, limits.close),
        )
        return WorkerLoop(parts, options)

    def close(self) -> None:
        self.tokens.close()
        self.backends.close()
        self.stat_cache.close()
        self.engine.dispose()

    def __enter__(self) -> App:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_migrated(engine: Engine) -> None:
    """The database answers and has a schema (``alembic_version`` has a row)."""
    with engine.connect() as conn:
        migrated = sa.inspect(conn).has_table("alembic_version") and (
            conn.execute(sa.text("SELECT version_num FROM alembic_version")).first() is not None
        )
    if not migrated:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"database {where} has no datasync schema: migrate it first")


def bootstrap(settings: Settings | None = None, *, migrate: bool = True) -> App:
    """Build the application from ``settings`` (default: ``load_settings()``).

    Creates ``settings.home`` if needed and migrates the database to the newest schema.
    ``migrate=False`` (spawned worker processes, whose parent migrated before spawning
    them) only checks that the database has a schema, without loading Alembic and its
    migration scripts. Raises ``ConfigError`` for unusable settings.
    """
    settings = settings if settings is not None else load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    try:
        if migrate:
            from datasync.db.migrate import upgrade_to_head

            upgrade_to_head(engine)
        else:
            _check_migrated(engine)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = " ".join(str(exc.orig).split())  # one line: psycopg adds hint lines
        raise ConfigError(f"cannot open database {where}: {reason}") from exc
    bus = EventBus()
    observability = build_observability(engine, settings)
    bus.subscribe(observability.recorder)  # metrics
    bus.subscribe(observability.event_log)  # one log record per event, with an action key
    store = ManifestStore(engine)
    stat_cache = StatCache(settings.stat_cache_path)
    service = DatasyncService(settings, store, stat_cache, RemoteSources(settings), bus)
    retry = RetryPolicy()
    state = EngineState(engine, bus, retry, settings.link_caps())
    planner = Planner(engine, settings, state)
    backends = SiteBackends(settings.sites, wrap=lambda _site, b: RetryingBackend(b, retry))
    scheduler = Scheduler(engine, settings, state)
    evictor = Evictor(engine, settings, state, backends)
    replication = ReplicationService(
        settings, engine, store, state, planner, backends, scheduler.tick, evictor.make_room
    )
    staging = StageService(replication, state, store)
    explainer = Explainer(engine, store, scheduler, staging, state.sharing)
    policies = PolicyEngine(engine, settings, state, store, replication)
    bus.subscribe(policies.on_event)  # a new version goes where its policies say, at once
    bus.subscribe(replication.on_event)  # sources refreshed, labels followed at every site
    verifier = Verifier(engine, store, state, backends, replication)
    auditor = Auditor(engine, state, backends, verifier, settings.home)
    return App(
        settings=settings,
        engine=engine,
        bus=bus,
        store=store,
        stat_cache=stat_cache,
        service=service,
        state=state,
        planner=planner,
        replication=replication,
        scheduler=scheduler,
        staging=staging,
        explainer=explainer,
        evictor=evictor,
        policies=policies,
        retry=retry,
        backends=backends,
        verifier=verifier,
        observability=observability,
        tokens=TokenService(engine),
        auditor=auditor,
    )
