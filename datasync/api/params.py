"""How names and references are documented in the OpenAPI document.

The patterns below describe what the service accepts (``datasync.manifest.refs``,
``datasync.auth``) so that clients and schemathesis know it. They are documented, not
enforced by FastAPI: the service's own checks refuse what does not fit with a message
that says what is wrong (400), where a pattern mismatch would only say "should match
'^[a-z0-9]...'". ``tests/unit/test_properties.py`` pins that each pattern agrees with
the check it describes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query

__all__ = [
    "DATASET_PATTERN",
    "ID_MAX",
    "LABEL_PATTERN",
    "NAMESPACE_PATTERN",
    "REF_PATTERN",
    "SITE_PATTERN",
    "TOKEN_NAME_PATTERN",
    "DatasetPath",
    "LabelQuery",
    "RefPath",
    "RefQuery",
    "documented",
]

_SEGMENT = "[a-z0-9][a-z0-9._-]{0,63}"
_LABEL = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# A dataset segment of 64 hex digits is refused too (it would look like a version id);
# JSON Schema patterns cannot say "not" without look-arounds, so that rule stays in words.
DATASET_PATTERN = f"^{_SEGMENT}(/{_SEGMENT}){{0,2}}$"
LABEL_PATTERN = f"^{_LABEL}$"
REF_PATTERN = f"^{_SEGMENT}(/{_SEGMENT}){{0,2}}(@{_LABEL})?$"
NAMESPACE_PATTERN = f"^{_SEGMENT}$"
SITE_PATTERN = "^[A-Za-z0-9_-]+$"
TOKEN_NAME_PATTERN = LABEL_PATTERN

DATASET_EXAMPLE = "drive/tokyo-urban"
REF_EXAMPLE = "drive/tokyo-urban@v1"


def documented(pattern: str, example: str | None = None) -> dict[str, Any]:
    """``json_schema_extra`` of a field whose ``pattern`` is documented, not enforced."""
    extra: dict[str, Any] = {"pattern": pattern}
    if example is not None:
        extra["examples"] = [example]
    return extra


DatasetPath = Annotated[
    str,
    Path(
        description="Dataset name: 1 to 3 '/'-separated segments, the first its namespace.",
        json_schema_extra=documented(DATASET_PATTERN, DATASET_EXAMPLE),
    ),
]
RefPath = Annotated[
    str,
    Path(
        description="DATASET@REF: a label, a version id or a unique id prefix (@latest if "
        "left out).",
        json_schema_extra=documented(REF_PATTERN, REF_EXAMPLE),
    ),
]


def RefQuery(description: str) -> Any:
    return Query(description=description, json_schema_extra=documented(REF_PATTERN, REF_EXAMPLE))


LabelQuery = Annotated[
    str | None,
    Query(
        description="A label to point at the version.", json_schema_extra=documented(LABEL_PATTERN)
    ),
]

# Row ids are 64-bit: a larger id is bad input, not a database error.
ID_MAX = 2**63 - 1
