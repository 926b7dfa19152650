"""Typed settings, parsed once by ``load_settings`` in the composition root.

Sources, later ones winning: built-in defaults, the TOML file (``DATASYNC_CONFIG`` or
``$DATASYNC_HOME/datasync.toml`` or ``./datasync.toml``), then ``DATASYNC_*`` variables
(``DATASYNC_HOME``, ``DATASYNC_DATABASE_URL``). Nothing reads the environment at import time.

Example::

    database_url = "postgresql+psycopg://datasync@db/datasync"   # default: SQLite in home

    [sites.gaggle]
    url = "/lustre/datasets"
    concurrency = 16
    bandwidth_mbps = 20000
    quota_bytes = 900_000_000_000_000
    cost_per_gb = { aws = 0.0, azure = 0.0 }
    options = { lustre = "auto", stripe_small_count = 1, large_threshold_bytes = 1073741824 }

    [sites.aws]
    url = "s3://drive-datasets/prod"
    options = { endpoint_url = "https://s3.us-west-2.amazonaws.com", region_name = "us-west-2" }
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from datasync.errors import ConfigError
from datasync.models import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

__all__ = ["LinkConfig", "MaintenanceSettings", "Settings", "SiteConfig", "load_settings"]


class LinkConfig(BaseModel):
    """``[sites.SRC.links.DST]``: limits of the link from SRC to DST, on top of each site's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Most tasks on the link at once: the claim enforces it across every worker and host
    # (FTS3's per-link "max active"); each host's slot files enforce it per host as well.
    concurrency: int | None = Field(default=None, ge=1, le=1024)
    bandwidth_mbps: float | None = Field(default=None, gt=0)


_SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class SiteConfig(BaseModel):
    """One ``[sites.NAME]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    # Backend-specific options (endpoint_url, connection_string, region_name, ...).
    # They may hold secrets: never log or print them.
    options: dict[str, Any] = Field(default_factory=dict)
    concurrency: int = Field(default=8, ge=1, le=1024)
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    quota_bytes: int | None = Field(default=None, ge=0)
    cost_per_gb: dict[str, float] = Field(default_factory=dict)
    # Outgoing links by destination site: [sites.aws.links.gaggle] concurrency = 4
    links: dict[str, LinkConfig] = Field(default_factory=dict)


class MaintenanceSettings(BaseModel):
    """``[maintenance]``: the chores ``datasync up`` runs on a schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Re-hash blobs and check views at every site this often (0: never), repairing damage.
    verify_interval_hours: float = Field(default=24.0, ge=0)
    # At most this many bytes of blobs re-hashed per site and run (least recently first),
    verify_budget_bytes: int = Field(default=1024**4, ge=0)
    # at most this fast (bytes per second, per site).
    verify_rate_bytes: int = Field(default=200 * 1024**2, ge=1)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path
    database_url: str
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    hash_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    sites: dict[str, SiteConfig] = Field(default_factory=dict)
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)

    @field_validator("sites")
    @classmethod
    def _site_names(cls, v: dict[str, SiteConfig]) -> dict[str, SiteConfig]:
        for name in v:
            # ASCII only: ``SITE:path`` is recognised by exactly these characters.
            if not _SITE_NAME_RE.fullmatch(name):
                raise ValueError(f"site name {name!r} must be letters, digits, '-' or '_'")
        for name, site in v.items():
            unknown = sorted(set(site.links) - set(v))
            if unknown:
                raise ValueError(f"sites.{name}.links names unknown site(s) {unknown}")
        return v

    def link_caps(self) -> dict[tuple[str, str], int]:
        """Most live leases per link (``[sites.SRC.links.DST] concurrency``), cluster-wide."""
        return {
            (src, dst): link.concurrency
            for src, site in self.sites.items()
            for dst, link in site.links.items()
            if link.concurrency is not None
        }

    @property
    def stat_cache_path(self) -> Path:
        return self.home / "statcache.sqlite"


def _config_file(env: Mapping[str, str], home: Path) -> Path | None:
    explicit = env.get("DATASYNC_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"DATASYNC_CONFIG={explicit} does not exist")
        return path
    for candidate in (home / "datasync.toml", Path.cwd() / "datasync.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read the config file and environment once. Raises ``ConfigError`` with the reason."""
    env = os.environ if env is None else env
    home = Path(env.get("DATASYNC_HOME") or "~/.datasync").expanduser()
    data: dict[str, Any] = {}
    path = _config_file(env, home)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    # The environment wins over the file (see the module docstring).
    if env.get("DATASYNC_HOME") or "home" not in data:
        data["home"] = str(home)
    if env.get("DATASYNC_DATABASE_URL"):
        data["database_url"] = env["DATASYNC_DATABASE_URL"]
    data.setdefault("database_url", f"sqlite:///{Path(data['home']).expanduser() / 'datasync.db'}")
    data.update(overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from exc
