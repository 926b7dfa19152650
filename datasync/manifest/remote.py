"""Registration sources: which scanner reads a source string, and under which rules.

One policy for every source (``docs/manifest-format.md``, "One scanner policy"):

* **Local trees.** A plain path, a ``file://`` URL and ``SITE:path`` on a POSIX site are
  directories on this host, scanned by ``scan.scan_directory``: the same verdict on
  symlinks, special files and files changed while hashed, whichever way the tree is
  named. The version records ``directory:/real/path``.
* **Object stores.** ``s3://``, ``az://``, ``gs://`` and ``SITE:path`` on such a site are
  listed and hashed by ``cloudscan.scan_backend`` (ranged reads pinned to each object's
  ETag/generation, so a change during the scan fails where the store enforces it).
  Credentials and endpoints come from the ``[sites.NAME]`` table that holds the URL, else
  from the SDK's own chain. The version records the URL, or ``SITE:path``.
* **Other schemes** (``http(s)://``, ``zip://``, ...) are read through fsspec's read-only
  ``FsspecSource``: registration only, never transfers (``docs/bench-results/fsspec.md``).
* **Checked prefixes.** The part after ``SITE:`` and a URL's path are relative
  ``/``-separated paths without ``.``, ``..`` or empty segments, backslashes or control
  characters; one trailing ``/`` is allowed and the empty path names the site root
  (``check_prefix``). ``SITE:path`` on a POSIX site must also stay under the site's root
  once symlinks are resolved.
* **Site internals.** When the source is a configured site's root, its ``.datasync/``
  (blob store, temporary parts) is never scanned: it is datasync's, not dataset content
  (``skips_internal_dir``).

The recorded source is what ``transfer.sites.site_for_source`` later reads to find the
site and prefix that hold the version's files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from datasync.backends.base import Backend
from datasync.backends.cloudscan import scan_backend
from datasync.backends.fsspecsrc import FsspecSource
from datasync.backends.registry import has_backend, open_backend, parse_url
from datasync.config import Settings
from datasync.errors import UserError
from datasync.manifest.paths import INTERNAL_DIR
from datasync.models import FileEntry
from datasync.transfer.sites import site_for_source

__all__ = [
    "LocalTree",
    "RemoteSources",
    "RemoteTree",
    "check_prefix",
    "is_remote_source",
    "parse_source",
    "skips_internal_dir",
]

ProgressCallback = Callable[[int, int], None]

_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_SITE_RE = re.compile(r"^([A-Za-z0-9_-]+):(.*)$", re.DOTALL)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_LOCAL_SCHEMES = frozenset({"file", "posix"})


@dataclass(frozen=True, slots=True)
class LocalTree:
    """A directory on this host; ``within`` is the POSIX site root it was named under, and
    ``named`` how (``SITE:path``), for messages."""

    path: Path
    within: Path | None = None
    named: str = ""

    def resolve(self) -> Path:
        """The real directory to scan; ``UserError`` if it is not one, or if a symlink
        takes it out of the site root it was named under."""
        root = self.path.expanduser()
        if not root.is_dir():
            if self.named:
                raise UserError(f"{self.named} ({self.path}): not a directory (or does not exist)")
            head, sep, _ = str(self.path).partition(":")
            hint = f", and there is no site named {head!r}" if sep and "/" not in head else ""
            raise UserError(f"{self.path}: not a directory (or does not exist){hint}")
        real = root.resolve()
        if self.within is not None:
            base = self.within.resolve()
            if real != base and not real.is_relative_to(base):
                raise UserError(
                    f"{self.named or self.path} resolves to {real}, outside the site root "
                    f"{base}, through a symlink; register that directory by its own path"
                )
        return real


@dataclass(frozen=True, slots=True)
class RemoteTree:
    """An object-store (or fsspec) prefix: open ``url`` with ``options``, record ``record``."""

    url: str
    record: str
    options: dict[str, object] = field(default_factory=dict)


def check_prefix(source: str, prefix: str, *, url: bool = False) -> str:
    """Return ``prefix`` without its trailing ``/`` if it is a safe relative path, else
    raise ``UserError`` naming ``source`` and what is wrong. ``""`` means the root."""
    rel = prefix[:-1] if prefix.endswith("/") else prefix
    if not rel:
        return ""
    why = None
    if rel.startswith("/"):
        why = "is absolute (or starts with an empty segment)"
    elif "\\" in rel:
        why = "holds a backslash"
    elif _CONTROL_RE.search(rel):
        why = "holds a control character"
    else:
        for segment in rel.split("/"):
            if segment in ("", ".", ".."):
                why = f"has {'an empty' if not segment else f'a {segment!r}'} segment"
                break
    if why is None:
        return rel
    if url:
        raise UserError(
            f"{source!r}: the URL's path {why}; give the prefix as a relative "
            "'/'-separated path without '.', '..' or empty segments and without "
            "backslashes, e.g. s3://bucket/out/run1"
        )
    raise UserError(
        f"{source!r}: the path after the site name {why}; give a path relative to the "
        "site's root without '.', '..' or empty segments and without backslashes "
        "(nothing after ':' names the root), e.g. lustre:out/run1"
    )


def is_remote_source(source: str, site_names: frozenset[str] = frozenset()) -> bool:
    """``s3://...``, ``az://...``, ``gs://...`` (any URL) or ``SITE:path`` for a site in
    ``site_names``: a source string, not a plain local path."""
    if _URL_RE.match(source):
        return True
    match = _SITE_RE.match(source)
    return bool(match and match.group(1) in site_names)


def parse_source(
    settings: Settings, source: str, *, urls: bool = True
) -> LocalTree | RemoteTree | None:
    """What ``source`` names, with its prefix checked; None for a plain local path.

    ``SITE:path`` must name a configured site (else None: it is taken as a local path,
    and the caller says that no such directory or site exists). With ``urls=False`` a
    URL is None as well.
    """
    if not is_remote_source(source, frozenset(settings.sites)):
        return None
    if _URL_RE.match(source) is None:  # SITE:path of a configured site
        site_name, rest = source.split(":", 1)
        rel = check_prefix(source, rest)
        site = settings.sites[site_name]
        root = parse_url(site.url)
        if root.scheme == "file":
            return LocalTree(Path(root.path, rel), Path(root.path), source)
        return RemoteTree(_join(site.url, rel), f"{site_name}:{rel}", dict(site.options))
    if not urls:
        return None
    parts = urlsplit(source)
    if parts.scheme.lower() in _LOCAL_SCHEMES:
        path = unquote(parts.path)
        check_prefix(source, path[1:], url=True)
        return LocalTree(Path(parse_url(source).path))
    if has_backend(source):
        check_prefix(source, parts.path[1:], url=True)
    else:
        # fsspec URLs chain (``zip://::file:///x.zip``): only segments are checked.
        check_prefix(source, parts.path.strip("/"), url=True)
    found = site_for_source(settings, source)
    if found is None:
        return RemoteTree(source, source)
    site = settings.sites[found[0]]
    return RemoteTree(_join(site.url, found[1]), source, dict(site.options))


def skips_internal_dir(settings: Settings, record: str) -> bool:
    """Whether the source recorded as ``record`` is a site's root, so its ``.datasync/``
    is the site's own and not dataset content."""
    found = site_for_source(settings, record)
    return found is not None and found[1] == ""


class RemoteSources:
    """Scans object-store and fsspec registration sources. Built once by ``bootstrap``."""

    def __init__(self, settings: Settings, *, read_workers: int = 8) -> None:
        self.settings = settings
        self.read_workers = read_workers

    def scan(
        self, tree: RemoteTree, chunk_size: int, on_progress: ProgressCallback | None = None
    ) -> Iterator[FileEntry]:
        skip = (INTERNAL_DIR + "/",) if skips_internal_dir(self.settings, tree.record) else ()
        backend = _open_source(tree.url, tree.options)
        try:
            yield from scan_backend(
                backend,
                "",
                chunk_size=chunk_size,
                workers=self.read_workers,
                on_progress=on_progress,
                skip=skip,
            )
        finally:
            backend.close()


def _open_source(url: str, options: dict[str, object]) -> Backend:
    if has_backend(url):
        return open_backend(url, options)
    return FsspecSource(url, options)  # registration only: any scheme fsspec knows


def _join(root: str, rel: str) -> str:
    rel = rel.strip("/")
    return f"{root.rstrip('/')}/{rel}" if rel else root
