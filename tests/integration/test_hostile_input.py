"""Hostile input (issue 2, item 6; issue 7), through the CLI and through the HTTP API.

Every case must be rejected with a clear message naming the problem, a non-zero exit
(CLI: 2) or a 4xx status (API), and NO state change: the row counts of every manifest
table are compared before and after, with a version already registered in the dataset.
The sources: producer and canonical manifests, local directories, ``SITE:path`` on a
POSIX site (whose path part is checked), and an S3 prefix on moto.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from datasync.api import API_PREFIX
from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.config import load_settings
from datasync.manifest.canonical import encode_entry, encode_header
from datasync.models import FileEntry, ManifestHeader
from tests.integration.api_helpers import admin_client
from tests.integration.manifest_helpers import counts, digest_of, row, write_producer

MiB = 1024 * 1024
D = digest_of(1)

# name -> (manifest lines after the header, or a full raw body; expected message)
MANIFEST_CASES: dict[str, tuple[list[Any], str]] = {
    "dotdot": ([row("a/../../etc/passwd")], "'..' segments are not allowed"),
    "dot": ([row("a/./b")], "'.' segments are not allowed"),
    "absolute": ([row("/etc/passwd")], "absolute paths are not allowed"),
    "empty-segment": ([row("a//b")], "empty path segment"),
    "trailing-slash": ([row("a/b/")], "empty path segment"),
    "empty-path": ([row("")], "empty path"),
    "nul": ([row("a\u0000b")], "control character U+0000"),
    "newline": ([row("a\nb")], "control character U+000A"),
    "escape": ([row("a\u001b[31mb")], "control character U+001B"),
    "c1-control": ([row("a\u0085b")], "control character U+0085"),
    "lone-surrogate": (['{"path":"a\\ud800","size":1,"digest":"' + D + '"}'], "UTF-8"),
    "duplicate": ([row("x/y"), row("a"), row("x/y", 2)], "duplicate path 'x/y'"),
    "nfc-twins": ([row("caf\u00e9.jpg"), row("cafe\u0301.jpg", 2)], "duplicate path 'café.jpg'"),
    "sha256-digest": ([row("a", digest="sha256:" + "0" * 64)], "bad digest"),
    "short-digest": ([row("a", digest="xxh3-128:" + "0" * 31)], "bad digest"),
    "upper-hex-digest": ([row("a", digest="xxh3-128:" + "A" * 32)], "bad digest"),
    # A wrong type on purpose: the parser must refuse a digest that is not a string.
    "digest-not-string": ([row("a", digest=12)], "digest must be a string"),  # type: ignore[arg-type]
    "negative-size": ([row("a", size=-1)], "outside 0.."),
    "absurd-size": ([row("a", size=10 * 1024**5)], "outside 0.."),
    # A wrong type on purpose: the parser must refuse a size that is not an integer.
    "float-size": ([row("a", size=1.5)], "size must be an integer"),  # type: ignore[arg-type]
    "bool-size": ([row("a", size=True)], "size must be an integer"),
    "missing-digest": ([{"path": "a", "size": 1}], "missing required key 'digest'"),
    "unknown-key": ([row("a", owner="me")], "unknown key(s) ['owner']"),
    "not-an-object": (["[1, 2]"], "expected a JSON object"),
    "invalid-json": (['{"path": "a", "size":'], "not valid JSON"),
    "nan-size": (['{"path":"a","size":NaN,"digest":"' + D + '"}'], "not valid JSON"),
    "blank-line": ([row("a"), ""], "blank line"),
    "missing-chunks": ([row("big", size=100 * MiB)], "needs 'chunks'"),
    "wrong-chunk-count": ([row("big", size=3 * MiB, chunks=[D])], "has 1 chunk digests"),
    "chunks-on-small-file": ([row("a", size=5, chunks=[D])], "has 1 chunk digests"),
    # Unpublishable versions: a file that another path needs as a directory, a backslash.
    "file-and-directory": (
        [row("a/b/c"), row("a.txt"), row("a", 2)],
        "'a' is a file, but 'a/b/c' needs 'a' to be a directory",
    ),
    "backslash": ([row("dir\\file.jpg")], "backslash"),
}


def _canonical(*paths: str) -> bytes:
    header = ManifestHeader(chunk_size=1024 * 1024)
    return encode_header(header) + b"".join(encode_entry(FileEntry(p, 1, D)) for p in paths)


RAW_CASES: dict[str, tuple[bytes, str]] = {
    "no-header": (b"", "missing header"),
    "wrong-format": (b'{"format":"tar"}\n', "header format is 'tar'"),
    "bad-chunk-size": (b'{"format":"datasync-producer/1","chunk_size":5}\n', "bad chunk_size"),
    "header-not-json": (b"\xff\xfe\n", "line 1"),
    "canonical-file-and-directory": (
        _canonical("x", "x.y", "x/y"),
        "line 4: 'x' is a file, but 'x/y' needs 'x' to be a directory",
    ),
}


def _escaping_link(root: Path) -> None:
    (root / "evil").symlink_to("/etc/passwd")


def _relative_escape(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("../../outside.txt")
    (root.parent / "outside.txt").write_text("secret")


def _fifo(root: Path) -> None:
    os.mkfifo(root / "pipe")


def _socket(root: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()


def _device(root: Path) -> None:
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:  # pragma: no cover - only as non-root (a failure under CI)
        pytest.skip("mknod needs root")


def _nfc_twins(root: Path) -> None:
    (root / "caf\u00e9.jpg").write_bytes(b"1")
    (root / "cafe\u0301.jpg").write_bytes(b"2")


def _control_name(root: Path) -> None:
    (root / "bad\nname.jpg").write_bytes(b"1")


def _non_utf8_name(root: Path) -> None:
    with open(os.path.join(os.fsencode(root), b"\xff\xfe.jpg"), "wb") as f:
        f.write(b"1")


def _backslash_name(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "a\\b.jpg").write_bytes(b"1")


DIRECTORY_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink-escapes-absolute": (_escaping_link, "points outside the root"),
    "symlink-escapes-relative": (_relative_escape, "points outside the root"),
    "fifo": (_fifo, "FIFO"),
    "socket": (_socket, "socket"),
    "device": (_device, "character device"),
    "nfc-twins": (_nfc_twins, "café.jpg"),
    "control-char-name": (_control_name, "control character U+000A"),
    "non-utf8-name": (_non_utf8_name, "UTF-8"),
    "backslash-name": (_backslash_name, "'a\\\\b.jpg': backslash"),
}


@dataclass
class World:
    app: App
    client: TestClient
    runner: CliRunner
    env: dict[str, str]
    url: str
    tmp: Path

    def cli(self, *args: str) -> tuple[int, str]:
        result = self.runner.invoke(cli_app, list(args), env=self.env)
        assert "Traceback" not in result.output
        assert result.stdout == ""
        return result.exit_code, result.stderr


def _world(tmp_path: Path, sites: dict[str, dict[str, Any]]) -> Iterator[World]:
    """CLI and API over one database and one config file holding ``sites``."""
    url = f"sqlite:///{tmp_path / 'home' / 'datasync.db'}"
    config = tmp_path / "datasync.toml"
    # JSON strings are valid TOML basic strings, and these options are flat.
    config.write_text(
        "".join(
            f"[sites.{name}]\n"
            + "".join(f"{key} = {_toml(value)}\n" for key, value in table.items())
            for name, table in sites.items()
        )
    )
    env = {
        "DATASYNC_HOME": str(tmp_path / "home"),
        "DATASYNC_DATABASE_URL": url,
        "DATASYNC_CONFIG": str(config),
    }
    with bootstrap(load_settings(env=env)) as app, admin_client(app) as client:
        good = write_producer(tmp_path / "good.jsonl", [row("ok/a.bin"), row("ok/b.bin", 2)])
        app.service.register_manifest("drive/a", good, label="v1")
        yield World(app, client, CliRunner(), env, url, tmp_path)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """With a POSIX site ``lustre`` rooted at ``tmp_path / "site"``."""
    (tmp_path / "site").mkdir()
    yield from _world(tmp_path, {"lustre": {"url": str(tmp_path / "site")}})


def _manifest_bytes(world: World, name: str) -> tuple[Path, str]:
    if name in RAW_CASES:
        raw, message = RAW_CASES[name]
        path = world.tmp / "hostile.jsonl"
        path.write_bytes(raw)
        return path, message
    lines, message = MANIFEST_CASES[name]
    return write_producer(world.tmp / "hostile.jsonl", [row("ok/first"), *lines]), message


@pytest.mark.parametrize("via", ["cli", "api"])
@pytest.mark.parametrize("name", [*MANIFEST_CASES, *RAW_CASES])
def test_hostile_manifests_are_rejected_without_state_change(
    world: World, name: str, via: str
) -> None:
    path, message = _manifest_bytes(world, name)
    before = counts(world.url)
    if via == "cli":
        code, err = world.cli("register", "drive/a", "--manifest", str(path), "-l", "v2")
        assert code == 2
        assert err.startswith("datasync: error: ") and message in err
    else:
        r = world.client.post(
            f"{API_PREFIX}/datasets/drive/a/versions/manifest",
            params={"label": "v2"},
            content=path.read_bytes(),
        )
        assert r.status_code == 422, r.text
        assert message in r.json()["error"]
    assert counts(world.url) == before


@pytest.mark.parametrize("via", ["cli", "api"])
@pytest.mark.parametrize("name", list(DIRECTORY_CASES))
def test_hostile_directories_are_rejected_without_state_change(
    world: World, name: str, via: str
) -> None:
    make, message = DIRECTORY_CASES[name]
    root = world.tmp / "site" / "tree"  # the API scans directories of configured sites only
    root.mkdir()
    (root / "fine.jpg").write_bytes(b"fine")
    make(root)
    before = counts(world.url)
    if via == "cli":
        code, err = world.cli("register", "drive/a", str(root), "--label", "v2")
        assert code == 2
        assert err.startswith("datasync: error: ") and message in err
        assert err.count("\n") == 1
    else:
        r = world.client.post(
            f"{API_PREFIX}/datasets/drive/a/versions/directory",
            json={"path": str(root), "label": "v2"},
        )
        assert r.status_code == 422, r.text
        assert message in r.json()["error"]
    assert counts(world.url) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["register", "drive/../x", "."], "invalid dataset name"),
        (["register", "DRIVE/x", "."], "invalid dataset name"),
        (["register", "a/b/c/d", "."], "invalid dataset name"),
        (["register", f"drive/{'0a' * 32}", "."], "64 hex digits, which is what a version id"),
        (["register", "drive/a", ".", "--label", "../x"], "invalid label"),
        (["register", "drive/a", ".", "--label", "a" * 64], "invalid label"),
        (["register", "drive/a", ".", "--chunk-size", "0"], "out of range"),
        (["register", "drive/a", ".", "--chunk-size", "8GiB"], "out of range"),
        (["label", "drive/a@v1", "bad label"], "invalid label"),
        (["label", "drive/a@nope", "v3"], "no label or version id 'nope'"),
    ],
)
def test_hostile_names_are_rejected_without_state_change(
    world: World, args: list[str], message: str
) -> None:
    before = counts(world.url)
    code, err = world.cli(*args)
    assert code == 2 and message in err
    assert counts(world.url) == before


def _register_tree(world: World, via: str, source: str, status: int) -> str:
    """Register ``source`` (CLI, or the API's directory route) expecting a refusal; the
    error line."""
    if via == "cli":
        code, err = world.cli("register", "drive/a", source, "--label", "v2")
        assert code == 2, err
        assert err.startswith("datasync: error: ") and err.count("\n") == 1
        return err
    r = world.client.post(
        f"{API_PREFIX}/datasets/drive/a/versions/directory", json={"path": source, "label": "v2"}
    )
    assert r.status_code == status, r.text
    return str(r.json()["error"])


@pytest.mark.parametrize("via", ["cli", "api"])
@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("../outside/d", "has a '..' segment"),
        ("/abs", "is absolute"),
        ("a/../b", "has a '..' segment"),
        ("./a/b", "has a '.' segment"),
        ("a//b", "has an empty segment"),
        ("a\\b", "holds a backslash"),
    ],
)
def test_hostile_site_paths_are_refused_without_state_change(
    world: World, rel: str, why: str, via: str
) -> None:
    # They name real directories, so the refusal is the check and not a miss (``/abs`` is
    # left alone: an absolute path is refused before anything is looked up).
    site = world.tmp / "site"
    for directory in (world.tmp / "outside" / "d", site / "a" / "b", site / "a\\b"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "f").write_bytes(b"f")
    before = counts(world.url)
    message = _register_tree(world, via, f"lustre:{rel}", 400)
    assert repr(f"lustre:{rel}") in message
    assert why in message and "relative to the site's root" in message
    assert counts(world.url) == before


def test_hostile_url_prefixes_are_refused_without_state_change(world: World) -> None:
    before = counts(world.url)
    for source, why in [
        ("s3://bucket/a/../b", "has a '..' segment"),
        ("gs://bucket//x", "is absolute"),
        (f"file://{world.tmp}/site/../outside", "has a '..' segment"),
    ]:
        code, err = world.cli("register", "drive/a", source)
        assert code == 2 and why in err and "the URL's path" in err, err
    assert counts(world.url) == before


@pytest.fixture
def s3_world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """With an S3 site ``pipeline`` on moto holding an unpublishable prefix ``clash/``
    (``a`` next to ``a/b``) and one holding a backslash key ``slash/``."""
    from tests.fixtures.emulators import S3_KEYS, make_s3_backend

    s3 = make_s3_backend(request)
    for key in ("clash/a", "clash/a.txt", "clash/a/b", "slash/ok", "slash/a\\b"):
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=key.encode())
    options: dict[str, Any] = {"endpoint_url": str(request.getfixturevalue("moto_server"))}
    options |= {"region_name": "us-east-1", **S3_KEYS}
    yield from _world(tmp_path, {"pipeline": {"url": f"s3://{s3.bucket}", "options": options}})


@pytest.mark.emulator
@pytest.mark.parametrize("via", ["cli", "api"])
@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("clash", "'a' is a file, but 'a/b' needs 'a' to be a directory"),
        ("slash/", "'a\\\\b': backslash"),
    ],
)
def test_unpublishable_s3_prefixes_are_refused_without_state_change(
    s3_world: World, prefix: str, message: str, via: str
) -> None:
    before = counts(s3_world.url)
    assert message in _register_tree(s3_world, via, f"pipeline:{prefix}", 422)
    assert counts(s3_world.url) == before
