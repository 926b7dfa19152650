"""Producer manifests: line-numbered validation, and agreement with the shipped JSON Schemas."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource

from datasync.errors import InvalidManifest, InvalidPath
from datasync.manifest.canonical import entry_from_dict, header_from_dict
from datasync.manifest.producer import parse_producer_header, read_producer_manifest
from datasync.models import DEFAULT_CHUNK_SIZE, MAX_FILE_SIZE, FileEntry, ManifestHeader

MiB = 1024 * 1024
D0 = "xxh3-128:" + "0" * 32
D1 = "xxh3-128:" + "1" * 32
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((MANIFESTS / name).read_text())
    return schema


CANONICAL = load("manifest.schema.json")
PRODUCER = load("producer-manifest.schema.json")
REGISTRY: Registry[Any] = Registry().with_resources(
    [(s["$id"], Resource.from_contents(s)) for s in (CANONICAL, PRODUCER)]
)


def validator(schema: dict[str, Any], part: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{schema['$id']}#/$defs/{part}"}, registry=REGISTRY
    )


PRODUCER_ENTRY = validator(PRODUCER, "entry")
PRODUCER_HEADER = validator(PRODUCER, "header")
CANONICAL_ENTRY = validator(CANONICAL, "entry")
CANONICAL_HEADER = validator(CANONICAL, "header")


def read(text: str | bytes) -> tuple[ManifestHeader, list[FileEntry]]:
    data = text.encode() if isinstance(text, str) else text
    header, entries = read_producer_manifest(io.BytesIO(data))
    return header, list(entries)


def line(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


HEAD = line({"format": "datasync-producer/1", "chunk_size": MiB})


def test_schemas_are_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(CANONICAL)
    jsonschema.Draft202012Validator.check_schema(PRODUCER)


def test_the_shipped_example_is_valid_by_both_validators() -> None:
    path = MANIFESTS / "example-producer.jsonl"
    raw = path.read_bytes().splitlines()
    PRODUCER_HEADER.validate(json.loads(raw[0]))
    for r in raw[1:]:
        PRODUCER_ENTRY.validate(json.loads(r))
    header, entries = read_producer_manifest(path)
    got = list(entries)
    assert header == ManifestHeader(chunk_size=MiB)
    assert len(got) == len(raw) - 1
    assert {e.path for e in got} >= {"notes/Zürich café.txt", "empty.flag"}
    assert len(next(e for e in got if e.path.startswith("lidar")).chunks) == 3


def test_any_order_and_default_chunk_size() -> None:
    header, entries = read(
        line({"format": "datasync-producer/1"})
        + line({"path": "z", "size": 1, "digest": D0})
        + line({"path": "cafe\u0301", "size": 2, "digest": D1})
    )
    assert header.chunk_size == DEFAULT_CHUNK_SIZE
    assert header.format == "datasync-manifest/1"
    assert [e.path for e in entries] == ["z", "caf\u00e9"]


def test_no_trailing_newline_is_fine() -> None:
    _, entries = read(HEAD + json.dumps({"path": "a", "size": 1, "digest": D0}))
    assert len(entries) == 1


@pytest.mark.parametrize(
    ("body", "err", "match"),
    [
        (
            '{"path": "a", "size": 1, "digest": "' + D0 + '"\n',
            InvalidManifest,
            "line 2: not valid JSON",
        ),
        (
            line({"path": "a", "size": 1, "digest": D0}) + "\n",
            InvalidManifest,
            "line 3: blank line",
        ),
        (
            '{"path": "a", "size": NaN, "digest": "x"}\n',
            InvalidManifest,
            "line 2: not valid JSON: NaN",
        ),
        (
            line({"path": "a", "size": 1, "digest": D0, "x": 1}),
            InvalidManifest,
            r"line 2: unknown key",
        ),
        (
            line({"path": "a", "size": -1, "digest": D0}),
            InvalidManifest,
            "line 2: size -1 is outside",
        ),
        (line({"path": "a", "size": MAX_FILE_SIZE + 1, "digest": D0}), InvalidManifest, "outside"),
        (line({"path": "a", "size": 10**30, "digest": D0}), InvalidManifest, "outside"),
        (line({"path": "a", "size": True, "digest": D0}), InvalidManifest, "must be an integer"),
        (
            line({"path": "a", "size": 1, "digest": "sha256:" + "0" * 64}),
            InvalidManifest,
            "bad digest",
        ),
        (line({"path": "a", "size": 1, "digest": D0[:-1]}), InvalidManifest, "bad digest"),
        (
            line({"path": "a", "size": 3 * MiB, "digest": D0, "chunks": [D0, D0]}),
            InvalidManifest,
            "has 2 chunk",
        ),
        (line({"path": "a", "size": 3 * MiB, "digest": D0}), InvalidManifest, "needs 'chunks'"),
        (line({"path": "../a", "size": 1, "digest": D0}), InvalidPath, "line 2: invalid path"),
        (line({"path": "a\u0000", "size": 1, "digest": D0}), InvalidPath, "line 2: invalid path"),
        ('{"path": "\\ud800", "size": 1, "digest": "' + D0 + '"}\n', InvalidPath, "UTF-8"),
        (b'{"path": "\xff", "size": 1}\n', InvalidManifest, "line 2: not valid UTF-8"),
        ("[1, 2]\n", InvalidManifest, "line 2: expected a JSON object"),
    ],
)
def test_bad_lines_name_their_line_number(
    body: str | bytes, err: type[Exception], match: str
) -> None:
    ok = line({"path": "ok", "size": 1, "digest": D0})
    data = HEAD.encode() + (body if isinstance(body, bytes) else body.encode())
    with pytest.raises(err, match=match):
        read(data)
    with pytest.raises(
        err, match=match.replace("line 2", "line 3").replace("line 3: blank", "line 4: blank")
    ):
        read(HEAD.encode() + ok.encode() + (body if isinstance(body, bytes) else body.encode()))


@pytest.mark.parametrize(
    ("first", "match"),
    [
        ("\n", "missing header"),
        ("{\n", "line 1: not valid JSON"),
        (
            line({"format": "datasync-manifest/1", "chunk_size": MiB}),
            "expected 'datasync-producer/1'",
        ),
        (line({"format": "datasync-producer/1", "chunk_size": 1000}), "bad chunk_size"),
        (line({"format": "datasync-producer/1", "chunk_size": "64M"}), "bad chunk_size"),
        (line({"format": "datasync-producer/1", "extra": 1}), "unknown header key"),
        (line({"path": "a", "size": 1, "digest": D0}), "line 1: unknown header key"),
    ],
)
def test_bad_headers(first: str, match: str) -> None:
    with pytest.raises(InvalidManifest, match=match):
        read(first + line({"path": "a", "size": 1, "digest": D0}))


def test_an_empty_stream_has_no_header() -> None:
    with pytest.raises(InvalidManifest, match="line 1: missing header"):
        read(b"")


def test_a_path_argument_is_closed_after_reading(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text(HEAD + line({"path": "a", "size": 1, "digest": D0}))
    _, entries = read_producer_manifest(p)
    assert [e.path for e in entries] == ["a"]
    assert isinstance(entries, types.GeneratorType)
    assert entries.gi_frame is None


# --- the hand-written validator agrees with the JSON Schema -----------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
good_digest = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "xxh3-128:" + h)
digest_like = st.one_of(
    good_digest,
    good_digest,
    good_digest,
    st.sampled_from(
        [
            "xxh3-128:" + "0" * 31,
            "xxh3-128:" + "0" * 33,
            "xxh3-128:" + "A" * 32,
            "xxh3-64:" + "0" * 16,
            "md5:" + "0" * 32,
            "xxh3-128:" + "0" * 32 + "\n",
            "",
        ]
    ),
    json_scalars,
)
good_path = st.lists(
    st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters=["/"]),
        min_size=1,
        max_size=5,
    ),
    min_size=1,
    max_size=4,
).map("/".join)
path_like = st.one_of(
    good_path,
    good_path,
    good_path,
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=12),
    st.sampled_from(
        ["a", "a/b", ".", "..", "a/./b", "../a", "/a", "a/", "a//b", "..a", "a\n", "é", "a\x85"]
    ),
    json_scalars,
)
size_like = st.one_of(
    st.integers(0, 5 * MiB),
    st.integers(0, 5 * MiB),
    st.integers(0, 5 * MiB),
    st.sampled_from([0, MAX_FILE_SIZE, MAX_FILE_SIZE + 1, -1, 1.0, 2.5, True, "5"]),
    json_scalars,
)


BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "path": path_like,
    "size": size_like,
    "digest": digest_like,
    "chunks": st.one_of(st.lists(digest_like, max_size=6), st.lists(good_digest, max_size=6)),
}


@st.composite
def entry_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid entry, then 0-2 mutations (0 is what hypothesis favours, so ~half stay valid)."""
    size = draw(st.integers(0, 5 * MiB))
    obj: dict[str, Any] = {"path": draw(good_path), "size": size, "digest": draw(good_digest)}
    n = -(-size // MiB) if size > MiB else 0
    if n or draw(st.booleans()):
        obj["chunks"] = draw(st.lists(good_digest, min_size=n, max_size=n))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["path", "size", "digest", "chunks", "drop", "extra", "scalar"]))
        if key == "drop":
            obj.pop(draw(st.sampled_from(sorted(obj))), None)
        elif key == "extra":
            obj[draw(st.sampled_from(["mode", "Path", "chunk", ""]))] = 1
        elif key == "scalar":
            obj[draw(st.sampled_from(sorted(BAD_VALUES)))] = draw(json_scalars)
        else:
            obj[key] = draw(BAD_VALUES[key])
    return obj


def datasync_accepts(obj: dict[str, Any], chunk_size: int) -> bool:
    try:
        entry_from_dict(obj, chunk_size)
    except (InvalidManifest, InvalidPath):
        return False
    return True


def extra_rules_hold(obj: dict[str, Any], chunk_size: int) -> bool:
    """What datasync checks beyond the schema (documented in docs/manifest-format.md)."""
    if type(obj["size"]) is not int:  # the schema's "integer" admits 1.0
        return False
    n = -(-obj["size"] // chunk_size) if obj["size"] > chunk_size else 0
    return len(obj.get("chunks", [])) == n


@settings(max_examples=400, deadline=None)
@given(entry_objects(), st.sampled_from([MiB, 2 * MiB]))
def test_validator_agrees_with_the_producer_schema(obj: dict[str, Any], chunk_size: int) -> None:
    schema_ok = PRODUCER_ENTRY.is_valid(obj)
    mine = datasync_accepts(obj, chunk_size)
    if schema_ok:
        # Paths here are short, so the byte limits (which the schema cannot state) never bite.
        assert mine == extra_rules_hold(obj, chunk_size), obj
    else:
        assert not mine, obj


@settings(max_examples=200, deadline=None)
@given(entry_objects())
def test_canonical_entries_obey_the_canonical_schema(obj: dict[str, Any]) -> None:
    if datasync_accepts(obj, MiB):
        e = entry_from_dict(obj, MiB)
        canonical = json.loads(
            json.dumps(
                {"path": e.path, "size": e.size, "digest": e.digest}
                | ({"chunks": list(e.chunks)} if e.chunks else {})
            )
        )
        assert CANONICAL_ENTRY.is_valid(canonical)


@given(
    st.dictionaries(
        st.sampled_from(["format", "chunk_size", "other"]),
        st.one_of(
            st.sampled_from(["datasync-producer/1", "datasync-manifest/1", MiB, 2**32, 2**32 + 1]),
            json_scalars,
        ),
    )
)
def test_header_validators_agree_with_the_schemas(obj: dict[str, Any]) -> None:
    try:
        parse_producer_header(obj)
        mine = True
    except InvalidManifest:
        mine = False
    # The schema's integer admits 1048576.0; datasync wants an integer literal.
    if isinstance(obj.get("chunk_size"), float):
        assert not mine
    else:
        assert mine == PRODUCER_HEADER.is_valid(obj), obj
    try:
        header_from_dict(obj)
        mine_c = True
    except InvalidManifest:
        mine_c = False
    if not isinstance(obj.get("chunk_size"), float):
        assert mine_c == CANONICAL_HEADER.is_valid(obj), obj
