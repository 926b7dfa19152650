"""Hostile input as properties: references and names, the patterns the API documents for
them, manifests of arbitrary bytes, and configuration.

Each property says that bad input is refused with a ``UserError`` (``ConfigError``,
``InvalidManifest``, ...) and nothing else: no other exception escapes, whatever the bytes.
What these found: names and labels with a trailing newline were accepted (``$`` matches
before a final ``\\n``), a manifest line of nested brackets raised ``RecursionError`` (a 500
in the API), a config file that is not UTF-8 raised ``UnicodeDecodeError``, and non-ASCII
site names were accepted that ``SITE:path`` can never name.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasync.api.params import (
    DATASET_PATTERN,
    LABEL_PATTERN,
    NAMESPACE_PATTERN,
    REF_PATTERN,
    SITE_PATTERN,
    TOKEN_NAME_PATTERN,
)
from datasync.auth.roles import Role, check_namespaces
from datasync.auth.tokens import check_token_name
from datasync.config import load_settings
from datasync.errors import ConfigError, InvalidManifest, InvalidPath, UserError
from datasync.manifest.canonical import encode_entry, encode_header
from datasync.manifest.refs import check_dataset_name, check_label, is_id_prefix, parse_ref
from datasync.models import FileEntry, ManifestHeader
from datasync.service import _read_manifest

HEX64 = re.compile(r"[0-9a-f]{64}")
HOSTILE_CHARS = "aZ09._-/@\n\r\t\x00 é\u0301\u202e:%\\"


def near(pattern: str) -> st.SearchStrategy[str]:
    """Strings that fit ``pattern``, the same with a trailing newline or a hostile
    character spliced in, and arbitrary text."""
    fits = st.from_regex(pattern, fullmatch=True)
    spliced = st.tuples(fits, st.sampled_from(HOSTILE_CHARS), st.integers(0, 200)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    )
    return st.one_of(fits, fits.map(lambda s: s + "\n"), spliced, st.text(HOSTILE_CHARS))


def accepts(check: Callable[[str], object], text: str) -> bool:
    try:
        check(text)
    except UserError:
        return False
    return True


@pytest.mark.parametrize(
    ("pattern", "check"),
    [
        (DATASET_PATTERN, check_dataset_name),
        (LABEL_PATTERN, check_label),
        (NAMESPACE_PATTERN, lambda ns: check_namespaces(Role.OWNER, [ns])),
        (TOKEN_NAME_PATTERN, check_token_name),
    ],
    ids=["dataset", "label", "namespace", "token-name"],
)
def test_each_documented_pattern_is_what_its_check_accepts(
    pattern: str, check: Callable[[str], object]
) -> None:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(near(pattern))
    def agree(text: str) -> None:
        documented = re.fullmatch(pattern, text) is not None
        # A 64-hex segment (a version id's shape), or a label shaped like an id prefix, is
        # refused in words, not by the pattern.
        id_shaped = any(HEX64.fullmatch(segment) for segment in text.split("/")) or (
            check is check_label and is_id_prefix(text)
        )
        assert accepts(check, text) == (documented and not id_shaped), repr(text)

    agree()


@settings(max_examples=400)
@given(near(REF_PATTERN))
def test_a_reference_parses_to_checked_parts_or_is_refused(text: str) -> None:
    try:
        ref = parse_ref(text)
    except UserError:
        assert re.fullmatch(REF_PATTERN, text) is None or any(
            HEX64.fullmatch(s) for s in re.split("[/@]", text)
        ), repr(text)
        return
    assert re.fullmatch(REF_PATTERN, text), repr(text)
    assert check_dataset_name(ref.dataset) == ref.dataset
    assert parse_ref(str(ref)) == ref  # DATASET alone means DATASET@latest
    assert not re.search(r"[\x00-\x1f\s]", str(ref))


def test_site_names_are_what_site_path_can_name(tmp_path: Path) -> None:
    @settings(max_examples=200)
    @given(st.text(HOSTILE_CHARS + "²ä", min_size=0, max_size=8))
    def names(name: str) -> None:
        try:
            parsed = load_settings(
                {"DATASYNC_HOME": str(tmp_path)}, {"sites": {name: {"url": "/x"}}}
            )
        except ConfigError as exc:
            assert re.fullmatch(SITE_PATTERN, name) is None, exc
            assert "site name" in str(exc)
            return
        assert re.fullmatch(SITE_PATTERN, name) and list(parsed.sites) == [name]

    names()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
config_keys = st.sampled_from(
    ["home", "database_url", "chunk_size", "hash_workers", "sites", "maintenance", "url",
     "concurrency", "options", "bandwidth_mbps", "quota_bytes", "cost_per_gb", "x"]
)  # fmt: skip
config_values = st.recursive(
    json_values, lambda inner: st.dictionaries(config_keys, inner, max_size=4), max_leaves=12
)


@settings(max_examples=300)
@given(st.dictionaries(config_keys, config_values, max_size=5))
def test_any_configuration_is_settings_or_one_config_error(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as home:
        try:
            parsed = load_settings({"DATASYNC_HOME": home}, data)
        except ConfigError as exc:
            assert "\n" not in str(exc).split(":", 1)[0]  # the first line names the file
            return
    for name, site in parsed.sites.items():
        assert re.fullmatch(SITE_PATTERN, name) and 1 <= site.concurrency <= 1024


@settings(max_examples=200)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_config_file_is_settings_or_one_config_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "datasync.toml"
        path.write_bytes(raw)
        try:
            load_settings({"DATASYNC_HOME": home, "DATASYNC_CONFIG": str(path)})
        except ConfigError as exc:
            assert str(path) in str(exc)


PRODUCER_HEADER = b'{"format":"datasync-producer/1","chunk_size":1048576}\n'
CANONICAL_HEADER = encode_header(ManifestHeader(chunk_size=1 << 20))
line_bytes = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.builds(
        lambda p, size: encode_entry(FileEntry(p, size, "xxh3-128:" + "0" * 32)).rstrip(b"\n"),
        st.text("ab/.é\u0301", min_size=1, max_size=6).filter(lambda p: p.strip("/.") == p),
        st.integers(0, 1 << 21),
    ).filter(bool),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([PRODUCER_HEADER, CANONICAL_HEADER, b""]),
    st.lists(line_bytes, max_size=6),
)
def test_a_manifest_of_any_bytes_is_entries_or_one_invalid_manifest(
    header: bytes, lines: list[bytes]
) -> None:
    body = header + b"".join(line.replace(b"\n", b"") + b"\n" for line in lines)
    try:
        _, entries = _read_manifest(io.BytesIO(body))
        read = list(entries)
    except (InvalidManifest, InvalidPath) as exc:
        assert str(exc).startswith("line ") or "manifest" in str(exc) or "path" in str(exc)
        return
    assert len(read) == len(lines)
