"""Names and references: dataset names, label names and ``DATASET@REF`` parsing.

* A dataset name is 1 to 3 ``/``-separated segments of ``[a-z0-9._-]``, each starting with
  a letter or digit (``drive/tokyo-urban``). The first segment is the namespace. No
  segment is 64 lowercase hex digits: views live at ``<root>/<dataset>/<version-id>/``,
  so ``drive/<64 hex>`` would be a directory of dataset ``drive``'s views.
* A label is 1 to 128 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, and
  does not look like a version id or an id prefix (``MIN_PREFIX`` or more lowercase hex
  digits only, such as ``beef`` or ``2026``): a label must never shadow an id.
* ``DATASET@REF``: a REF that looks like an id prefix is resolved as one (a unique prefix of
  at least ``MIN_PREFIX`` hex digits, or a full id); a label of that form made before the
  rule is found only when no id matches. Any other REF is a label. A shorter all-hex REF
  that is no label is refused as "prefix too short". ``DATASET`` alone means
  ``DATASET@latest``.

Pure functions; resolution against the database lives in ``datasync.manifest.store``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datasync.errors import UnknownReference, UserError

__all__ = [
    "LATEST",
    "MIN_PREFIX",
    "Ref",
    "check_dataset_name",
    "check_label",
    "is_id_prefix",
    "looks_like_id",
    "parse_ref",
]

LATEST = "latest"
MIN_PREFIX = 4
MAX_DATASET_SEGMENTS = 3

# Always ``fullmatch``: with ``match``, ``$`` also matches before a final newline.
_SEGMENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True, slots=True)
class Ref:
    dataset: str
    ref: str

    def __str__(self) -> str:
        return f"{self.dataset}@{self.ref}"


def check_dataset_name(name: str) -> str:
    """Return ``name`` if valid, else raise ``UserError`` saying what is wrong."""
    segments = name.split("/")
    if (
        not name
        or len(segments) > MAX_DATASET_SEGMENTS
        or not all(_SEGMENT_RE.fullmatch(s) for s in segments)
    ):
        raise UserError(
            f"invalid dataset name {name!r}: use 1-{MAX_DATASET_SEGMENTS} '/'-separated "
            "segments of lowercase letters, digits, '.', '_' or '-', each starting with a "
            "letter or digit (e.g. drive/tokyo-urban)"
        )
    for segment in segments:
        if _is_version_id(segment):
            raise UserError(
                f"invalid dataset name {name!r}: segment {segment[:12]}... is 64 hex digits, "
                "which is what a version id looks like; views live at "
                "<root>/<dataset>/<version-id>/, so it would collide with a version "
                "directory. Choose a name that is not a 64-hex string"
            )
    return name


def _is_version_id(text: str) -> bool:
    return len(text) == 64 and bool(_HEX_RE.fullmatch(text))


def check_label(label: str) -> str:
    if not _LABEL_RE.fullmatch(label) or _is_version_id(label):
        raise UserError(
            f"invalid label {label!r}: use up to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not a 64-hex version id"
        )
    if is_id_prefix(label):
        raise UserError(
            f"invalid label {label!r}: it looks like a version id prefix ({MIN_PREFIX} or more"
            " hex digits), and ids come first in DATASET@REF; add a letter outside a-f or a"
            f" separator (v{label}, {label[:4]}-{label[4:] or '01'})"
        )
    return label


def is_id_prefix(ref: str) -> bool:
    """Whether ``ref`` has the form of a version id or an id prefix (ids come first)."""
    return MIN_PREFIX <= len(ref) <= 64 and bool(_HEX_RE.fullmatch(ref))


def looks_like_id(ref: str) -> bool:
    """All lowercase hex: a version id, an id prefix, or one too short to be used as one."""
    return bool(_HEX_RE.match(ref)) and len(ref) <= 64


def parse_ref(text: str) -> Ref:
    """Split ``DATASET@REF`` (``DATASET`` alone means ``@latest``) and validate both parts."""
    dataset, sep, ref = text.partition("@")
    if sep and not ref:
        raise UnknownReference(f"empty reference in {text!r}: expected DATASET@LABEL or @ID")
    check_dataset_name(dataset)
    ref = ref or LATEST
    if not (_LABEL_RE.fullmatch(ref) or is_id_prefix(ref)):
        raise UnknownReference(f"{text!r}: {ref!r} is neither a label nor a version id")
    return Ref(dataset, ref)
