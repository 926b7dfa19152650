"""URL → backend. SDKs are imported only when a URL of their scheme is opened.

Accepted forms::

    /abs/path, ./rel/path      posix (a relative path is made absolute)
    file:///abs/path           posix (percent-decoded, as file URLs are)
    memory://NAME/PREFIX       in-process store NAME (tests)
    s3://BUCKET/PREFIX         datasync.backends.s3:S3Backend       (boto3)
    az://ACCOUNT/CONTAINER/P   datasync.backends.azure:AzureBackend (azure-storage-blob)
    gs://BUCKET/PREFIX         datasync.backends.gcs:GCSBackend     (google-cloud-storage)

Each backend class has ``from_url(url: SplitResult, options) -> Backend``; it receives the
split URL (cloud paths are *not* percent-decoded: ``s3://b/a%20b`` means the prefix
``a%20b``, as in the AWS CLI and rclone) and the site's ``options`` table. ``SITE:path``
is resolved by the config layer before it gets here.

Credentials never leave this module in text: errors quote ``redact(url)``, and
``redact_options`` masks secret-looking option values for logs.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from datasync.backends.base import Backend
from datasync.errors import ConfigError

__all__ = [
    "backend_target",
    "has_backend",
    "open_backend",
    "parse_url",
    "redact",
    "redact_options",
    "register_scheme",
]

# scheme -> ("module:Class", install hint)
_SCHEMES: dict[str, tuple[str, str]] = {
    "file": ("datasync.backends.posix:PosixBackend", "built in"),
    "memory": ("datasync.backends.memory:MemoryBackend", "built in"),
    "s3": ("datasync.backends.s3:S3Backend", "pip install boto3 'botocore[crt]'"),
    "az": ("datasync.backends.azure:AzureBackend", "pip install azure-storage-blob azure-identity"),
    "gs": ("datasync.backends.gcs:GCSBackend", "pip install google-cloud-storage"),
}
_ALIASES = {"posix": "file"}

_SECRET_WORD = re.compile(
    r"(secret|password|passwd|token|key|sig|signature|credential|sas|auth)", re.IGNORECASE
)
_MASK = "***"


def register_scheme(scheme: str, target: str, hint: str) -> None:
    """Add (or replace) a scheme: ``target`` is ``"module:Class"``."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _SCHEMES[scheme.lower()] = (target, hint)


def parse_url(url: str) -> SplitResult:
    """Split ``url``, turning plain paths and ``file://`` URLs into ``file`` with a decoded
    absolute path. Raises ``ConfigError`` for unknown schemes."""
    if not url:
        raise ConfigError("empty storage URL")
    if url.startswith(("/", "./", "../", "~")) or "://" not in url:
        if "://" not in url and ":" in url.split("/", 1)[0]:
            raise ConfigError(
                f"{redact(url)!r} looks like SITE:path; resolve sites before opening a backend"
            )
        return SplitResult("file", "", os.path.abspath(os.path.expanduser(url)), "", "")
    parts = urlsplit(url)
    scheme = _ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in _SCHEMES:
        known = ", ".join(sorted(f"{s}://" for s in _SCHEMES))
        raise ConfigError(f"unknown storage URL scheme in {redact(url)!r}; known: {known}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URL {redact(url)!r} names a host; use a local path")
        return SplitResult("file", "", os.path.abspath(unquote(parts.path)), "", "")
    return parts._replace(scheme=scheme)


def has_backend(url: str) -> bool:
    """Whether a datasync backend serves ``url``'s scheme (plain paths count as ``file``)."""
    if "://" not in url:
        return True
    scheme = urlsplit(url).scheme.lower()
    return _ALIASES.get(scheme, scheme) in _SCHEMES


def backend_target(url: str) -> str:
    """``"module:Class"`` that serves ``url`` (nothing imported)."""
    return _SCHEMES[parse_url(url).scheme][0]


def open_backend(url: str, options: Mapping[str, Any] | None = None) -> Backend:
    """The backend for ``url``, importing its module (and SDK) now, not before."""
    parts = parse_url(url)
    target, hint = _SCHEMES[parts.scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or "?"
        if missing == module_name or module_name.startswith(missing + "."):
            raise ConfigError(
                f"no backend module {module_name} for {redact(url)!r} in this installation"
            ) from exc
        raise ConfigError(
            f"{parts.scheme}:// URLs need the {missing!r} package ({hint}) to open {redact(url)!r}"
        ) from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{module_name} has no {class_name} (for {redact(url)!r})")
    backend: Backend = cls.from_url(parts, dict(options or {}))
    return backend


def redact(url: str) -> str:
    """``url`` with any password and secret-looking query values replaced by ``***``."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{_MASK}@{host}" if ":" in userinfo else f"{_MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _MASK if _SECRET_WORD.search(k) else v) for k, v in pairs], safe="*")
    return parts._replace(netloc=netloc, query=query).geturl()


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a site's options safe to log: secret-looking values masked, nested too."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = redact_options(value)
        elif _SECRET_WORD.search(key) or (key.lower() == "connection_string"):
            out[key] = _MASK
        elif isinstance(value, str) and "://" in value:
            out[key] = redact(value)
        else:
            out[key] = value
    return out
