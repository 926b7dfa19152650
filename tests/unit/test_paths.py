"""Path normalization: NFC, relative, no dot/empty segments, no controls, byte limits."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datasync.errors import InvalidPath
from datasync.manifest.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    normalize_name,
    normalize_path,
)

CONTROLS = [chr(c) for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]]


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b.txt",
        "cam 0/frame 000001.jpg",
        "Zürich/café.txt",
        "100%/a+b=c",
        "..a",
        "a..",
        "...",
        ".hidden/.x",
        "emoji/😀",
        "a/ b /c ",
    ],
)
def test_valid_paths_are_unchanged(path: str) -> None:
    assert normalize_path(path) == path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("/a", "absolute"),
        ("/", "absolute"),
        ("..", "'..'"),
        (".", "'.'"),
        ("../a", "'..'"),
        ("a/..", "'..'"),
        ("a/../b", "'..'"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("a/.", "'.'"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("a\x00b", "U+0000"),
        ("a\tb", "U+0009"),
        ("a\nb", "U+000A"),
        ("a\x7f", "U+007F"),
        ("a\x85", "U+0085"),
        ("a/\x9f", "U+009F"),
        ("bad\udcff.jpg", "UTF-8"),
        ("\ud800", "UTF-8"),
        ("back\\slash", "backslash"),
        ("a/\\", "backslash"),
    ],
)
def test_hostile_paths_are_rejected_with_the_reason(path: str, why: str) -> None:
    with pytest.raises(InvalidPath, match="invalid path") as info:
        normalize_path(path)
    assert why in str(info.value)


def test_non_strings_are_rejected() -> None:
    with pytest.raises(InvalidPath, match="expected a string"):
        normalize_path(b"a")  # type: ignore[arg-type]  # bytes on purpose: refused at run time


def test_nfc_twins_normalize_to_the_same_path() -> None:
    decomposed = "cafe\u0301/e\u0301.txt"
    composed = "caf\u00e9/\u00e9.txt"
    assert normalize_path(decomposed) == normalize_path(composed) == composed
    # Canonical singletons are mapped too (KELVIN SIGN -> K, OHM SIGN -> GREEK OMEGA).
    assert normalize_path("\u212a/\u2126") == "K/\u03a9"


def test_segment_limit_counts_utf8_bytes_after_nfc() -> None:
    ok = "é" * 127 + "a"  # 255 bytes
    assert normalize_path(f"d/{ok}/x") == f"d/{ok}/x"
    with pytest.raises(InvalidPath, match="longer than 255 bytes"):
        normalize_path("d/" + "é" * 128)  # 256 bytes
    # 256 decomposed chars of 3 bytes each would be too long, but NFC makes them 2-byte.
    assert len(normalize_path("e\u0301" * 120).encode()) == 240
    assert MAX_SEGMENT_BYTES == 255


def test_total_limit_counts_utf8_bytes() -> None:
    ok = "/".join(["a" * 240] * 17)  # 17 * 240 + 16 slashes
    assert len(ok.encode()) == MAX_PATH_BYTES
    assert normalize_path(ok) == ok
    with pytest.raises(InvalidPath, match="4097 bytes long"):
        normalize_path(ok + "c")


def test_normalize_name_rejects_slashes() -> None:
    assert normalize_name("e\u0301") == "\u00e9"
    with pytest.raises(InvalidPath, match="may not contain '/'"):
        normalize_name("a/b")


def test_long_bad_paths_are_truncated_in_messages() -> None:
    with pytest.raises(InvalidPath) as info:
        normalize_path("/" + "x" * 10_000)
    assert len(str(info.value)) < 300


# --- properties -------------------------------------------------------------------------

segment_chars = st.characters(
    blacklist_categories=["Cs"], blacklist_characters=["/", "\\", *CONTROLS]
)
segments = st.text(segment_chars, min_size=1, max_size=12).filter(lambda s: s not in {".", ".."})
valid_paths = st.lists(segments, min_size=1, max_size=6).map("/".join)


@given(st.text(max_size=40))
def test_normalize_is_idempotent_and_its_output_obeys_every_rule(raw: str) -> None:
    try:
        out = normalize_path(raw)
    except InvalidPath:
        return
    assert normalize_path(out) == out
    assert unicodedata.is_normalized("NFC", out)
    assert out == unicodedata.normalize("NFC", raw)
    assert not out.startswith("/")
    parts = out.split("/")
    assert all(p not in {"", ".", ".."} for p in parts)
    assert not any(c in out for c in CONTROLS)
    assert "\\" not in out
    assert all(len(p.encode()) <= MAX_SEGMENT_BYTES for p in parts)


@given(valid_paths)
def test_valid_paths_are_accepted_as_their_nfc_form(path: str) -> None:
    # filter: NFC of a segment could in theory become "." or ".."; none does, assert it.
    assert normalize_path(path) == unicodedata.normalize("NFC", path)


@given(
    valid_paths,
    st.sampled_from(["/", "..", ".", "", *CONTROLS, "\udc80"]),
    st.data(),
)
def test_inserting_a_bad_element_is_rejected(path: str, bad: str, data: st.DataObject) -> None:
    parts = path.split("/")
    if bad in {"..", ".", ""}:
        i = data.draw(st.integers(0, len(parts)))
        candidate = "/".join([*parts[:i], bad, *parts[i:]])
    elif bad == "/":
        candidate = data.draw(st.sampled_from(["/" + path, path + "/"]))
    else:
        i = data.draw(st.integers(0, len(path)))
        candidate = path[:i] + bad + path[i:]
    with pytest.raises(InvalidPath):
        normalize_path(candidate)


@given(st.text(segment_chars, min_size=1, max_size=8))
def test_nfc_twins_always_collapse(text: str) -> None:
    nfd = unicodedata.normalize("NFD", text)
    if text in {".", ".."}:
        return
    assert normalize_path(nfd) == normalize_path(text)
