"""Typed settings, parsed once by ``load_settings`` in the composition root.

Sources, later ones winning: built-in defaults, the TOML file (``DATASYNC_CONFIG`` or
``$DATASYNC_HOME/datasync.toml`` or ``./datasync.toml``), then ``DATASYNC_*`` variables
(``DATASYNC_HOME``, ``DATASYNC_DATABASE_URL``). Nothing reads the environment at import time.

Mistakes are refused when the settings are read, each as one line naming the field
(``ConfigError``): unknown keys, a relative ``home``, a site ``url`` that is relative
(it would depend on the current directory) or of an unknown scheme, two sites with the
same root or one root inside another (their blob stores and views would collide), and a
relative SQLite path. ``check_database`` adds the rule for SQLite files named by a
``database_url`` (the default ``$DATASYNC_HOME/datasync.db`` is created by any command):
only commands that can store something in an empty database create one (``creates``), in
a directory that exists; every other command refuses a database file that is not there,
so a mistyped ``database_url`` is an error instead of a fresh, empty database.

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

import itertools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from datasync.backends.registry import parse_url, redact
from datasync.errors import ConfigError
from datasync.models import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

__all__ = [
    "LinkConfig",
    "MaintenanceSettings",
    "Settings",
    "SiteConfig",
    "check_database",
    "load_settings",
    "site_root",
]


def site_root(url: str) -> tuple[str, str]:
    """``(scheme, normalized root)`` of a site or source URL, comparable between sites and
    with registration sources (a POSIX root with its symlinks resolved). Raises
    ``ConfigError`` for an unknown scheme."""
    parts = parse_url(url)
    if parts.scheme == "file":
        return "file", os.path.realpath(parts.path).rstrip("/") or "/"
    return parts.scheme, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


def _store(site: SiteConfig) -> str:
    """The endpoint a site's options name ("": its scheme's default). Two sites are on
    the same store, where roots can collide, only if this is the same."""
    for name in ("endpoint_url", "endpoint", "account_url"):
        if site.options.get(name):
            return str(site.options[name]).rstrip("/")
    for part in str(site.options.get("connection_string") or "").split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "blobendpoint":
            return value.strip().rstrip("/")
    return ""


def _inside(root: str, other: str) -> bool:
    """Whether ``root`` is ``other`` or below it."""
    return root == other or root.startswith(other.rstrip("/") + "/")


class LinkConfig(BaseModel):
    """``[sites.SRC.links.DST]``: limits of the link from SRC to DST, on top of each site's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Most tasks on the link at once: the claim enforces it across every worker and host
    # (FTS3's per-link "max active"); each host's slot files enforce it per host as well.
    concurrency: int | None = Field(default=None, ge=1, le=1024)
    bandwidth_mbps: float | None = Field(default=None, gt=0)


SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


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

    @field_validator("url")
    @classmethod
    def _absolute_known_url(cls, url: str) -> str:
        head = url.split("/", 1)[0]
        if "://" not in url and not url.startswith(("/", "~")) and ":" not in head:
            raise ValueError(
                f"{redact(url)!r} is a relative path, which would depend on the current"
                " directory: write it absolute (/data/out) or as a URL (s3://bucket/prefix)"
            )
        try:
            site_root(url)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return url


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

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        if not home.is_absolute():
            raise ValueError(f"{str(home)!r} is a relative path: write it absolute")
        return home

    @field_validator("database_url")
    @classmethod
    def _absolute_sqlite(cls, url: str) -> str:
        path = _sqlite_file(url)
        if path is not None and not path.is_absolute():
            raise ValueError(
                f"the SQLite file {str(path)!r} is a relative path, which would depend on the"
                f" current directory; an absolute path takes four slashes: sqlite:////{path}"
            )
        return url

    @field_validator("sites")
    @classmethod
    def _site_names(cls, v: dict[str, SiteConfig]) -> dict[str, SiteConfig]:
        for name in v:
            # ASCII only: ``SITE:path`` is recognised by exactly these characters.
            if not SITE_NAME_RE.fullmatch(name):
                raise ValueError(f"site name {name!r} must be letters, digits, '-' or '_'")
        for name, site in v.items():
            unknown = sorted(set(site.links) - set(v))
            if unknown:
                raise ValueError(f"sites.{name}.links names unknown site(s) {unknown}")
        # Sorted, a root comes right before the roots inside it (on the same store).
        roots = sorted(((*site_root(site.url), _store(site)), name) for name, site in v.items())
        for (root, outer), (other, inner) in itertools.combinations(roots, 2):
            same_store = (root[0], root[2]) == (other[0], other[2])
            if same_store and _inside(other[1], root[1]):
                how = "the same root as" if root == other else "a root inside that of"
                raise ValueError(
                    f"site {inner!r} has {how} site {outer!r}: their blob stores and views"
                    " would collide; give each site its own root"
                )
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


def _sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None for other databases and ``:memory:``."""
    import sqlalchemy as sa  # deferred: settings are read by processes that never need it

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None  # ``create_engine`` names the problem
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def check_database(settings: Settings, *, creates: bool) -> None:
    """Refuse an SQLite database the command would create by mistake (``ConfigError``).

    The default database (``home / "datasync.db"``) is created by any command. Another
    file is created only by a command that ``creates`` (one that can store something in an
    empty database), in a directory that exists; any other command needs the file to
    exist: a mistyped URL must not answer from an empty database.
    """
    path = _sqlite_file(settings.database_url)
    if path is None or path.exists() or path == settings.home / "datasync.db":
        return
    url = settings.database_url
    if not creates:
        raise ConfigError(
            f"no database at {path} ({url}): nothing was ever recorded there. Check"
            " DATASYNC_DATABASE_URL / database_url for a typo, or register a version first"
        )
    if not path.parent.is_dir():
        raise ConfigError(
            f"directory {path.parent} of the database {url} does not exist: create it, or"
            " fix DATASYNC_DATABASE_URL / database_url"
        )


def _error_line(error: ErrorDetails) -> str:
    """One pydantic error as ``field.path: what is wrong``, without the value (secrets)."""
    where = ".".join(str(part) for part in error.get("loc", ())) or "settings"
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown key"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, int | float) and not isinstance(given, bool):
        message += f" (got {given})"
    return f"{where}: {message}"


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
    home = Path(env.get("DATASYNC_HOME") or "~/.datasync").expanduser().absolute()
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
        lines = "; ".join(_error_line(error) for error in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {lines}") from None
