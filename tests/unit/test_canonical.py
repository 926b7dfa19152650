"""The canonical form and the version id (invariant 1: the id is a function of the bytes)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasync.errors import InvalidManifest, InvalidPath
from datasync.manifest.canonical import (
    FileDirClashCheck,
    VersionIdBuilder,
    encode_entry,
    encode_header,
    entry_from_dict,
    header_from_dict,
    loads_strict,
    path_sort_key,
    read_canonical,
    version_id,
    write_canonical,
)
from datasync.models import MAX_FILE_SIZE, FileEntry, ManifestHeader, chunk_count

MiB = 1024 * 1024
D0 = "xxh3-128:" + "0" * 32
D1 = "xxh3-128:" + "1" * 32
HEADER = ManifestHeader(chunk_size=MiB)


def reference_line(obj: dict[str, Any]) -> bytes:
    """The spec, spelled with json.dumps."""
    return (
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    ).encode()


def as_dict(e: FileEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"path": e.path, "size": e.size, "digest": e.digest}
    if e.chunks:
        d["chunks"] = list(e.chunks)
    return d


def test_header_bytes() -> None:
    assert encode_header(ManifestHeader()) == (
        b'{"chunk_size":67108864,"format":"datasync-manifest/1"}\n'
    )
    assert encode_header(HEADER) == reference_line(
        {"format": "datasync-manifest/1", "chunk_size": MiB}
    )
    with pytest.raises(InvalidManifest, match="unknown manifest format"):
        encode_header(ManifestHeader(format="other/1"))
    with pytest.raises(InvalidManifest, match="bad chunk_size"):
        encode_header(ManifestHeader(chunk_size=1000))


def test_golden_version_id_pins_the_format() -> None:
    """Invariant 1: if this id changes, every registered version id changes (a format bump)."""
    entries = [
        FileEntry("a.txt", 3, D0),
        FileEntry("a/b c/é.bin", 3 * MiB + 1, D1, (D0, D1, D0, D1)),
        FileEntry("z", 0, D1),
    ]
    buf = io.BytesIO()
    vid = write_canonical(HEADER, entries, buf)
    expected = (
        b'{"chunk_size":1048576,"format":"datasync-manifest/1"}\n'
        b'{"digest":"' + D0.encode() + b'","path":"a.txt","size":3}\n'
        b'{"chunks":["' + b'","'.join(x.encode() for x in (D0, D1, D0, D1)) + b'"],'
        b'"digest":"' + D1.encode() + b'","path":"a/b c/\xc3\xa9.bin","size":3145729}\n'
        b'{"digest":"' + D1.encode() + b'","path":"z","size":0}\n'
    )
    assert buf.getvalue() == expected
    assert vid == hashlib.sha256(expected).hexdigest()
    assert vid == "42b3cd9ec4c50ad403bbfb1e213fe2578e2e6b76902a0f5e81c49a9947f2786b"


def test_builder_counts_and_rejects_disorder_and_duplicates() -> None:
    b = VersionIdBuilder(HEADER)
    b.add(FileEntry("a-", 1, D0))
    b.add(FileEntry("a.b", 2, D0))
    b.add(FileEntry("a/b", 3, D0))  # '.' < '/' bytewise
    assert (b.files, b.bytes) == (3, 6)
    with pytest.raises(InvalidManifest, match="duplicate path 'a/b'"):
        b.add(FileEntry("a/b", 3, D0))
    with pytest.raises(InvalidManifest, match="out of order"):
        b.add(FileEntry("a.c", 3, D0))


def test_builder_refuses_a_file_that_another_path_needs_as_a_directory() -> None:
    b = VersionIdBuilder(HEADER)
    for path in ["a", "a b", "a.txt", "a.txt2/x"]:  # all between "a" and "a/..." bytewise
        b.add(FileEntry(path, 1, D0))
    with pytest.raises(InvalidPath) as info:
        b.add(FileEntry("a/deep/er", 1, D0))
    assert "'a' is a file, but 'a/deep/er' needs 'a' to be a directory" in str(info.value)
    assert "rename or remove one of them" in str(info.value)
    # Read back from canonical bytes, the same version is refused at the offending line.
    lines = [encode_entry(FileEntry(p, 1, D0)) for p in ["a", "a.txt", "a/b"]]
    with pytest.raises(InvalidPath, match="line 4: 'a' is a file, but 'a/b'"):
        list(read_canonical(io.BytesIO(encode_header(HEADER) + b"".join(lines)))[1])


def test_path_sort_key_is_utf8_bytes() -> None:
    paths = ["b", "a/x", "a.txt", "a0", "é", "z", "\U0001f600", "\uffff"]
    assert sorted(paths, key=path_sort_key) == sorted(paths, key=lambda p: p.encode())
    assert sorted(paths, key=path_sort_key)[:3] == ["a.txt", "a/x", "a0"]


# --- entry validation -------------------------------------------------------------------


def test_entry_from_dict_accepts_and_normalizes() -> None:
    e = entry_from_dict({"path": "cafe\u0301", "size": 5, "digest": D0}, MiB)
    assert e == FileEntry("caf\u00e9", 5, D0)
    big = {"path": "b", "size": 2 * MiB + 1, "digest": D0, "chunks": [D0, D1, D0]}
    assert entry_from_dict(big, MiB).chunks == (D0, D1, D0)
    assert entry_from_dict({"path": "c", "size": MiB, "digest": D0, "chunks": []}, MiB).chunks == ()


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"path": "a", "size": 1, "digest": D0, "mode": 420}, r"unknown key\(s\) \['mode'\]"),
        ({"path": "a", "size": 1}, "missing required key 'digest'"),
        ({"size": 1, "digest": D0}, "missing required key 'path'"),
        ({"path": "a", "size": True, "digest": D0}, "size must be an integer"),
        ({"path": "a", "size": 1.0, "digest": D0}, "size must be an integer"),
        ({"path": "a", "size": "1", "digest": D0}, "size must be an integer"),
        ({"path": "a", "size": -1, "digest": D0}, "outside"),
        ({"path": "a", "size": MAX_FILE_SIZE + 1, "digest": D0}, "outside"),
        ({"path": "a", "size": 1, "digest": "md5:" + "0" * 32}, "bad digest"),
        ({"path": "a", "size": 1, "digest": "xxh3-128:" + "0" * 31}, "bad digest"),
        ({"path": "a", "size": 1, "digest": "xxh3-128:" + "A" * 32}, "bad digest"),
        ({"path": "a", "size": 1, "digest": D0 + "\n"}, "bad digest"),
        ({"path": "a", "size": 1, "digest": 7}, "digest must be a string"),
        ({"path": "a", "size": 2 * MiB, "digest": D0}, "needs 'chunks' with 2 digests"),
        ({"path": "a", "size": 2 * MiB, "digest": D0, "chunks": [D0]}, "has 1 chunk digests"),
        ({"path": "a", "size": 5, "digest": D0, "chunks": [D0, D0]}, "has 2 chunk digests"),
        ({"path": "a", "size": 2 * MiB, "digest": D0, "chunks": [D0, "x"]}, "bad digest"),
        ({"path": "a", "size": 2 * MiB, "digest": D0, "chunks": [D0, 1]}, "must be a string"),
        ({"path": "a", "size": 2 * MiB, "digest": D0, "chunks": None}, "got null"),
        ({"path": "a", "size": 2 * MiB, "digest": D0, "chunks": "ab"}, "must be a list"),
    ],
)
def test_entry_from_dict_rejects(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidManifest, match=match):
        entry_from_dict(obj, MiB)


@pytest.mark.parametrize("path", ["../x", "/x", "a//b", "a\x00", 5])
def test_entry_from_dict_rejects_bad_paths(path: object) -> None:
    with pytest.raises(InvalidPath):
        entry_from_dict({"path": path, "size": 1, "digest": D0}, MiB)


def test_entry_from_dict_rejects_non_objects() -> None:
    with pytest.raises(InvalidManifest, match="expected a JSON object"):
        entry_from_dict([1, 2], MiB)  # type: ignore[arg-type]  # a list on purpose: refused at run time


def test_header_from_dict() -> None:
    assert header_from_dict({"chunk_size": MiB, "format": "datasync-manifest/1"}) == HEADER
    cases: list[tuple[dict[str, Any], str]] = [
        ({"chunk_size": MiB}, "header format"),
        ({"format": "datasync-manifest/1"}, "missing 'chunk_size'"),
        ({"format": "datasync-manifest/1", "chunk_size": True}, "bad chunk_size"),
        ({"format": "datasync-manifest/1", "chunk_size": MiB, "x": 1}, "unknown header"),
    ]
    for bad, match in cases:
        with pytest.raises(InvalidManifest, match=match):
            header_from_dict(bad)


def test_read_canonical_rejects_non_canonical_bytes() -> None:
    good = encode_header(HEADER) + encode_entry(FileEntry("a", 1, D0))
    header, entries = read_canonical(io.BytesIO(good))
    assert header == HEADER and list(entries) == [FileEntry("a", 1, D0)]
    spaced = encode_header(HEADER) + b'{"digest": "' + D0.encode() + b'", "path": "a", "size": 1}\n'
    with pytest.raises(InvalidManifest, match="line 2: line is not in canonical form"):
        list(read_canonical(io.BytesIO(spaced))[1])
    swapped = encode_header(HEADER) + encode_entry(FileEntry("b", 1, D0))
    swapped += encode_entry(FileEntry("a", 1, D0))
    with pytest.raises(InvalidManifest, match="line 3: manifest entries out of order"):
        list(read_canonical(io.BytesIO(swapped))[1])
    with pytest.raises(InvalidManifest, match="line 1: not valid JSON"):
        read_canonical(io.BytesIO(b"{nope\n"))
    with pytest.raises(InvalidPath, match="line 2: invalid path"):
        bad = encode_header(HEADER) + reference_line({"path": "../a", "size": 1, "digest": D0})
        list(read_canonical(io.BytesIO(bad))[1])


# --- properties -------------------------------------------------------------------------

path_chars = st.characters(
    blacklist_categories=["Cs", "Cc"], blacklist_characters=["/", "\x7f", "\\"]
)
paths = (
    st.lists(
        st.text(path_chars, min_size=1, max_size=6).filter(lambda s: s not in {".", ".."}),
        min_size=1,
        max_size=4,
    )
    .map("/".join)
    .filter(lambda p: unicodedata.is_normalized("NFC", p))
)
digests = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "xxh3-128:" + h)


@st.composite
def entries(draw: st.DrawFn, path: str | None = None) -> FileEntry:
    p = draw(paths) if path is None else path
    size = draw(st.one_of(st.integers(0, 3 * MiB + 5), st.integers(0, MAX_FILE_SIZE)))
    n = chunk_count(size, MiB)
    if n > 64:  # keep examples small: absurd sizes only without chunks
        size = draw(st.integers(0, MiB))
        n = 0
    chunks = tuple(draw(st.lists(digests, min_size=n, max_size=n)))
    return FileEntry(p, size, draw(digests), chunks)


def publishable(paths: list[str]) -> list[str]:
    """Drop every path that another one needs as a directory (``a`` when ``a/b`` is there)."""
    dirs = {p[:i] for p in paths for i, c in enumerate(p) if c == "/"}
    return [p for p in paths if p not in dirs]


@st.composite
def manifests(draw: st.DrawFn) -> list[FileEntry]:
    unique = publishable(draw(st.lists(paths, unique=True, max_size=12)))
    return sorted((draw(entries(p)) for p in unique), key=lambda e: path_sort_key(e.path))


@given(entries())
def test_encode_entry_equals_the_json_dumps_spelling(e: FileEntry) -> None:
    assert encode_entry(e) == reference_line(as_dict(e))
    assert entry_from_dict(json.loads(encode_entry(e)), MiB) == e


clash_paths = st.lists(st.text("ab0.-!é", min_size=1, max_size=3), min_size=1, max_size=4).map(
    "/".join
)


@settings(max_examples=500)
@given(st.lists(clash_paths, unique=True, max_size=40))
def test_streaming_clash_check_agrees_with_a_set_check(paths: list[str]) -> None:
    """The stack-based check over the sorted stream finds exactly the first path (in
    canonical order) that lies under another file, and the shortest such file."""
    keys = sorted(p.encode() for p in paths)
    files = set(keys)
    expected = None
    for key in keys:
        # Brute force: every proper '/'-prefix of the path, looked up in the set of files.
        under = [key[:i] for i, byte in enumerate(key) if byte == ord("/") and key[:i] in files]
        if under:
            expected = (min(under, key=len), key)
            break
    check = FileDirClashCheck()
    got = None
    for key in keys:
        found = check.add(key)
        if found is not None:
            got = (found, key)
            break
    assert got == expected


def test_clash_check_memory_stays_bounded_over_a_long_stream() -> None:
    """The stack only holds paths that are prefixes of the current one."""
    check = FileDirClashCheck()
    depth = 0
    for i in range(20_000):
        assert check.add(f"cam{i // 100:04d}/{i:08d}.jpg".encode()) is None
        depth = max(depth, len(check._stack))
    assert depth == 1


@given(manifests())
def test_round_trip_gives_the_same_entries_and_id(m: list[FileEntry]) -> None:
    """Invariant 1: reading canonical bytes back yields the same entries and id."""
    buf = io.BytesIO()
    vid = write_canonical(HEADER, m, buf)
    assert vid == hashlib.sha256(buf.getvalue()).hexdigest()
    buf.seek(0)
    header, it = read_canonical(buf)
    again = list(it)
    assert header == HEADER and again == m
    assert version_id(header, again) == vid


@given(manifests(), st.randoms(use_true_random=False))
def test_id_is_independent_of_input_order_once_sorted(
    m: list[FileEntry], rnd: random.Random
) -> None:
    """Invariant 1: identical content registered in any order gets the same id."""
    shuffled = list(m)
    rnd.shuffle(shuffled)
    assert version_id(HEADER, sorted(shuffled, key=lambda e: path_sort_key(e.path))) == (
        version_id(HEADER, m)
    )


@given(manifests().filter(bool), st.data())
def test_any_change_changes_the_id(m: list[FileEntry], data: st.DataObject) -> None:
    """Invariant 1: the id is a function of the content: any change changes it."""
    before = version_id(HEADER, m)
    i = data.draw(st.integers(0, len(m) - 1))
    e = m[i]
    kind = data.draw(st.sampled_from(["size", "digest", "path", "drop", "chunk_size"]))
    changed = list(m)
    header = HEADER
    if kind == "size" and not e.chunks and e.size < MiB:
        changed[i] = FileEntry(e.path, e.size + 1, e.digest)
    elif kind == "digest":
        other = data.draw(digests.filter(lambda d: d != e.digest))
        changed[i] = FileEntry(e.path, e.size, other, e.chunks)
    elif kind == "path":
        new = e.path + "~"
        if any(x.path == new for x in m):
            return
        changed[i] = FileEntry(new, e.size, e.digest, e.chunks)
        changed.sort(key=lambda x: path_sort_key(x.path))
    elif kind == "drop":
        del changed[i]
    else:
        if any(x.chunks for x in m):
            return
        header = ManifestHeader(chunk_size=2 * MiB)
        if any(x.size > MiB for x in m):
            return
    if changed == m and header == HEADER:
        return
    assert version_id(header, changed) != before


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    _containers,
    max_leaves=8,
)


@given(json_values, st.sampled_from(["", " ", "\n", "\r\n", " \t"]), st.sampled_from(["", " "]))
def test_loads_strict_matches_json_loads(value: Any, tail: str, head: str) -> None:
    text = head + json.dumps(value) + tail
    assert loads_strict(text.encode()) == json.loads(text)


@given(st.text(max_size=12))
def test_loads_strict_accepts_exactly_what_json_loads_accepts(text: str) -> None:
    try:
        want = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            loads_strict(text)
        return
    if "NaN" in text or "Infinity" in text:
        with pytest.raises(ValueError, match="not valid JSON"):
            loads_strict(text)
        return
    assert loads_strict(text) == want
