"""Task payloads: one serializer, round trips, refusal of malformed rows, and the docs.

``docs/task-states.md`` has one table row per task kind whose payload column lists the
payload's fields, nested ones as ``name: {fields}`` and sequences as ``name: [...]``;
the table is checked against the dataclasses here, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from datasync.db.transfer_tables import TASK_KINDS
from datasync.transfer import payloads as pl

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

DOC = Path(__file__).resolve().parents[2] / "docs" / "task-states.md"
BLOB = pl.ChunkedBlob("dst", "xxh3-128:" + "a" * 32, 10, 4, ("x", "y", "z"), pl.SourceRef("s", "k"))
EXAMPLES: list[pl.Payload] = [
    pl.BlobsPayload("dst", (pl.BlobItem("xxh3-128:" + "b" * 32, 3, pl.SourceRef("s", "k", "e")),)),
    pl.ChunksPayload(BLOB, 0, 2),
    pl.FinalizePayload(BLOB),
    pl.PublishPayload(7, "dst", "drive/x", "c" * 64),
    pl.LabelsPayload("dst", "drive/x"),
]


def _shape(cls: DataclassInstance | type[DataclassInstance]) -> str:
    """``a, b: {c, d}, e: [{f}]`` for a dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            out.append(f"{f.name}: {{{_shape(hint)}}}")
        elif typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            out.append(f"{f.name}: [{{{_shape(args[0])}}}]")
        else:
            out.append(f.name)
    return ", ".join(out)


@pytest.mark.parametrize("payload", EXAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip_through_json(payload: pl.Payload) -> None:
    kind = pl.kind_of(payload)
    assert pl.decode(kind, pl.encode(payload)) == payload


def test_every_kind_has_one_payload_and_the_schema_allows_it() -> None:
    assert {pl.kind_of(p) for p in EXAMPLES} == set(pl.TaskKind)
    assert set(TASK_KINDS) == {str(k) for k in pl.TaskKind}


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("blobs", {}),
        ("chunks", {"blob": {}, "first": 0, "last": 1}),
        ("publish", {"placement_id": "seven", "dst_site": "d", "dataset": "x", "version_id": "v"}),
        ("nonsense", {}),
    ],
)
def test_malformed_payloads_are_refused(kind: str, data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        pl.decode(kind, data)


def test_docs_list_exactly_the_payload_fields() -> None:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| `\{(.*)\}`", line)
        if m:
            rows[m.group(1)] = m.group(2)
    for payload in EXAMPLES:
        kind = str(pl.kind_of(payload))
        assert rows.get(kind) == _shape(type(payload)), f"docs/task-states.md row of {kind}"
