"""The one composition root: settings -> database -> state owner -> services -> worker parts.

Nothing in datasync connects, reads the environment or opens files at import time;
everything is built here, once per process, and torn down by ``App.close``. The CLI, the
HTTP API, the worker processes and the tests all start from ``bootstrap``. Constructors
below take their collaborators as required arguments; only this module chooses them.

Event subscribers (metrics, logs, the dashboard) are registered on ``App.bus`` here.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
from dataclasses import dataclass
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from datasync.config import Settings, load_settings
from datasync.db.engine import create_engine
from datasync.db.migrate import upgrade_to_head
from datasync.errors import ConfigError, DatasyncError, Throttled
from datasync.events import EventBus
from datasync.manifest.remote import RemoteSources
from datasync.manifest.statcache import StatCache
from datasync.manifest.store import ManifestStore
from datasync.service import DatasyncService
from datasync.transfer.buffers import BufferPool
from datasync.transfer.exec import ExecContext, Executor, SiteBackends
from datasync.transfer.limits import limits_from_settings
from datasync.transfer.planner import Planner
from datasync.transfer.service import ReplicationService
from datasync.transfer.siteindex import SiteIndex
from datasync.transfer.state import EngineState, TaskStates
from datasync.transfer.worker import MIB, WorkerLoop, WorkerOptions, WorkerParts

__all__ = ["App", "bootstrap"]


class _TaskRetry:
    """Delay between task attempts: jittered exponential, ``retry_after`` as a floor."""

    def __init__(self, base: float = 2.0, cap: float = 300.0) -> None:
        self.base = base
        self.cap = cap
        self._rng = random.Random()

    def task_retry_delay(
        self, attempts: int, max_attempts: int, exc: BaseException
    ) -> float | None:
        retryable = exc.retryable if isinstance(exc, DatasyncError) else True
        if not retryable or attempts >= max_attempts:
            return None
        delay = min(self.cap, self.base * 2.0 ** max(0, attempts - 1)) * self._rng.uniform(0.5, 1.5)
        if isinstance(exc, Throttled) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        return delay


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

    def worker(self, options: WorkerOptions) -> WorkerLoop:
        """A worker loop for this process: backends, host-wide limits, buffers, I/O pool."""
        settings = self.settings
        chunk = max(settings.chunk_size, MIB)
        backends = SiteBackends(settings.sites)
        limits = limits_from_settings(settings.home, settings.sites)
        io = cf.ThreadPoolExecutor(options.io_threads, thread_name_prefix="datasync-io")
        tasks = TaskStates(self.engine, self.bus, _TaskRetry(options.queue_backoff_base))
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
            closers=(lambda: io.shutdown(wait=True), backends.close, limits.close),
        )
        return WorkerLoop(parts, options)

    def close(self) -> None:
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


def bootstrap(settings: Settings | None = None) -> App:
    """Build the application from ``settings`` (default: ``load_settings()``).

    Creates ``settings.home`` if needed and migrates the database to the newest schema.
    Raises ``ConfigError`` for unusable settings.
    """
    settings = settings if settings is not None else load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    try:
        upgrade_to_head(engine)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = " ".join(str(exc.orig).split())  # one line: psycopg adds hint lines
        raise ConfigError(f"cannot open database {where}: {reason}") from exc
    bus = EventBus()
    store = ManifestStore(engine)
    stat_cache = StatCache(settings.stat_cache_path)
    service = DatasyncService(settings, store, stat_cache, RemoteSources(settings))
    state = EngineState(engine, bus, _TaskRetry())
    planner = Planner(engine, settings, state)
    replication = ReplicationService(settings, engine, store, state, planner)
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
    )
