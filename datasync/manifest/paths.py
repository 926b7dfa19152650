"""Path normalization: the one place that decides what a manifest path may be.

A manifest path is a relative, ``/``-separated, NFC-normalized UTF-8 string. Invariants
kept by ``normalize_path`` (and relied on by the canonical form, the stores and the views):

* NFC: two inputs that are NFC-twins (``"é"`` as U+00E9 vs ``e`` + U+0301) normalize to the
  SAME path. A tree or manifest holding both is therefore a duplicate, which the caller
  rejects (``scan`` per directory, ``VersionIdBuilder`` over a sorted manifest).
* Not absolute; no ``.`` or ``..`` segment; no empty segment (``a//b``, a leading or
  trailing ``/``); so joining it under any root stays under that root.
* No C0 controls, DEL or C1 controls (they break terminals, logs and line-based formats);
  no lone surrogates (non-UTF-8 names from ``os.fsdecode``, or ``\\udXXX`` JSON escapes).
* No backslash: datasync's object keys refuse it (``backends.base.check_key``; it is a
  separator on Windows and to many tools), so a version holding one could never be
  replicated to an object store. It is refused at registration, not at the first transfer.
* At most 255 UTF-8 bytes per segment (NAME_MAX on Linux, S3/GCS/Azure friendly) and
  4096 bytes in total (PATH_MAX).

Everything else is an ordinary character: spaces, ``%``, ``:``, emoji.

What one path cannot show, a file ``a`` next to a file ``a/b`` in the same version, is
refused by ``canonical.VersionIdBuilder`` over the sorted stream.
"""

from __future__ import annotations

import re
import unicodedata

from datasync.errors import InvalidPath

__all__ = [
    "INTERNAL_DIR",
    "MAX_PATH_BYTES",
    "MAX_SEGMENT_BYTES",
    "normalize_name",
    "normalize_path",
]

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096
# Under a site's root, datasync's own directory (blob store, temporary parts): never
# dataset content, so a registration of the site root does not scan it.
INTERNAL_DIR = ".datasync"

# C0 controls (includes NUL, TAB, LF), DEL, and the C1 block.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
# A "." or ".." segment anywhere (controls, so "\n" before "$", are rejected earlier).
_DOT_SEGMENT_RE = re.compile(r"(?:^|/)(\.\.?)(?:/|$)")


def _fail(raw: object, why: str) -> InvalidPath:
    shown = repr(raw)
    if len(shown) > 120:
        shown = shown[:100] + "...(truncated)"
    return InvalidPath(f"invalid path {shown}: {why}")


def normalize_path(raw: str) -> str:
    """Return the canonical form of the relative path ``raw`` or raise ``InvalidPath``.

    Idempotent: ``normalize_path(normalize_path(p)) == normalize_path(p)``.
    """
    if not isinstance(raw, str):
        raise _fail(raw, f"expected a string, got {type(raw).__name__}")
    if not raw:
        raise _fail(raw, "empty path")
    m = _CONTROL_RE.search(raw)
    if m:
        raise _fail(raw, f"control character U+{ord(m.group()):04X} is not allowed")
    if raw.isascii():
        path = raw
        nbytes = len(raw)
    else:
        try:
            nbytes = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise _fail(
                raw, "not valid UTF-8 (lone surrogate, e.g. a non-UTF-8 file name)"
            ) from None
        if unicodedata.is_normalized("NFC", raw):
            path = raw
        else:
            path = unicodedata.normalize("NFC", raw)
            nbytes = len(path.encode("utf-8"))
    if "\\" in path:
        raise _fail(
            raw,
            "backslash '\\' is not allowed (a separator on Windows; datasync refuses it in "
            "object keys, so the file could not be replicated to every site); rename it",
        )
    if path[0] == "/":
        raise _fail(raw, "absolute paths are not allowed; give a path relative to the root")
    if nbytes > MAX_PATH_BYTES:
        raise _fail(raw, f"{nbytes} bytes long, more than {MAX_PATH_BYTES}")
    if "//" in path or path[-1] == "/":
        raise _fail(raw, "empty path segment ('//' or a trailing '/')")
    m = _DOT_SEGMENT_RE.search(path)
    if m:
        raise _fail(raw, f"'{m.group(1)}' segments are not allowed")
    if nbytes > MAX_SEGMENT_BYTES:  # only then can a single segment be too long
        for segment in path.split("/"):
            if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
                raise _fail(
                    raw,
                    f"segment {segment[:40]!r}... is longer than {MAX_SEGMENT_BYTES} bytes",
                )
    return path


def normalize_name(raw: str) -> str:
    """Normalize one path segment (a directory entry's name); ``/`` is not allowed."""
    if "/" in raw:
        raise _fail(raw, "a name may not contain '/'")
    return normalize_path(raw)
