"""The one composition root: settings -> engine (migrated) -> stores -> service.

Nothing in datasync connects, reads the environment or opens files at import time;
everything is built here, once per process, and torn down by ``App.close``. The CLI,
the HTTP API and the tests all start from ``bootstrap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from datasync.config import Settings, load_settings
from datasync.db.engine import create_engine
from datasync.db.migrate import upgrade_to_head
from datasync.errors import ConfigError
from datasync.manifest.remote import RemoteSources
from datasync.manifest.statcache import StatCache
from datasync.manifest.store import ManifestStore
from datasync.service import DatasyncService

__all__ = ["App", "bootstrap"]


@dataclass
class App:
    """Everything a process needs, wired together."""

    settings: Settings
    engine: Engine
    store: ManifestStore
    stat_cache: StatCache
    service: DatasyncService

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
    store = ManifestStore(engine)
    stat_cache = StatCache(settings.stat_cache_path)
    service = DatasyncService(settings, store, stat_cache, RemoteSources(settings))
    return App(
        settings=settings, engine=engine, store=store, stat_cache=stat_cache, service=service
    )
