"""The ``datasync`` command line end to end, on SQLite and PostgreSQL.

In-process through typer's ``CliRunner`` (real database, real files), plus the installed
console script once in a subprocess to pin the non-TTY behaviour (no progress bar, one
JSON object on stdout).
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import datasync.manifest.scan as scan_module
from datasync import __version__
from datasync.cli import app, parse_size
from datasync.demo import DEMO_CHUNK_SIZE, MUTATED, generate, mutate
from datasync.errors import UserError
from datasync.manifest.hashing import hash_fd as real_hash_fd
from tests.integration.manifest_helpers import entries, write_producer

Invoke = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Invoke:
    """Run ``datasync ARGS`` in-process against a fresh home and database."""
    env = {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": db_url}
    return _invoker(env)


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> Invoke:
    return _invoker({"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": ""})


def _invoker(env: dict[str, str]) -> Invoke:
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(app, list(args), env=env)
        assert "Traceback" not in result.output, result.output
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    return invoke


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in a JSON object: {keys}"
    return dict(pairs)


def as_json(result: Result) -> Any:
    """The one JSON document on stdout, as a strict parser sees it (no duplicate keys)."""
    return json.loads(result.stdout, object_pairs_hook=_unique_keys)


def test_version_flag(sqlite_cli: Invoke) -> None:
    assert sqlite_cli("--version").stdout.strip() == f"datasync {__version__}"


def test_same_tree_twice_same_id_then_a_change_shows_in_diff(cli: Invoke, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = generate(tree)
    chunk = str(DEMO_CHUNK_SIZE)
    first = as_json(cli("register", "drive/tokyo", str(tree), "--chunk-size", "1MiB", "--json"))
    assert first["created"] is True and first["files"] == files and first["bytes"] > 0
    assert first["labels"] == ["latest"] and first["verified"] is True
    assert first["chunk_size"] == DEMO_CHUNK_SIZE
    again = as_json(cli("register", "drive/tokyo", str(tree), "--chunk-size", chunk, "--json"))
    assert again["version_id"] == first["version_id"] and again["created"] is False

    mutate(tree)
    second = as_json(
        cli("register", "drive/tokyo", str(tree), "-l", "v2", "--chunk-size", chunk, "--json")
    )
    assert second["created"] is True and second["version_id"] != first["version_id"]

    diff = as_json(
        cli("diff", f"drive/tokyo@{first['version_id'][:10]}", "drive/tokyo@v2", "--json")
    )
    changed, grown, added, removed = MUTATED
    assert [c["path"] for c in diff["changed"]] == [changed, grown]
    assert [c["path"] for c in diff["added"]] == [added]
    assert [c["path"] for c in diff["removed"]] == [removed]
    assert diff["changed"][0]["old_digest"] != diff["changed"][0]["new_digest"]
    human = cli("diff", f"drive/tokyo@{first['version_id']}", "drive/tokyo@latest").stdout
    assert f"M {changed}" in human and "1 added, 1 removed, 2 changed" in human

    listed = as_json(cli("versions", "drive/tokyo", "--json"))
    assert [v["version_id"] for v in listed] == [second["version_id"], first["version_id"]]
    assert "drive/tokyo" in as_json(cli("datasets", "--json"))
    shown = as_json(cli("show", "drive/tokyo@v2", "--files", "--json"))
    assert shown["version_id"] == second["version_id"] and shown["files"] == files
    assert len(shown["entries"]) == files
    shards = [f for f in shown["entries"] if f["path"].startswith("shards/")]
    assert len(shards) == 2 and all(len(f["chunks"]) == 4 for f in shards)
    assert "shards/train-00000.tar" in cli("show", "drive/tokyo", "--files").stdout

    labelled = as_json(cli("label", f"drive/tokyo@{first['version_id']}", "v1", "--json"))
    assert labelled["labels"] == ["v1"]
    assert "drive/tokyo@stable ->" in cli("label", "drive/tokyo@v1", "stable").stdout


def test_export_round_trips_and_producer_manifests_are_unverified(
    cli: Invoke, tmp_path: Path
) -> None:
    rows = [{"path": e.path, "size": e.size, "digest": e.digest} for e in entries(30)]
    producer = write_producer(tmp_path / "producer.jsonl", reversed(rows))
    reg = as_json(cli("register", "drive/prod", str(producer), "--label", "p1", "--json"))
    assert reg["verified"] is False and reg["files"] == 30 and reg["labels"] == ["latest", "p1"]
    again = as_json(cli("register", "drive/prod", "--manifest", str(producer), "--json"))
    assert again["version_id"] == reg["version_id"] and again["created"] is False

    out = tmp_path / "exported.jsonl"
    exported = as_json(cli("export", "drive/prod@p1", "-o", str(out), "--json"))
    assert exported["bytes_written"] == out.stat().st_size
    copy = as_json(cli("register", "drive/copy", str(out), "--json"))
    assert copy["version_id"] == reg["version_id"]
    assert cli("export", "drive/prod@p1").stdout_bytes == out.read_bytes()


def test_re_registration_re_hashes_only_changed_files(
    sqlite_cli: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []

    def counting(fd: int, *args: Any, **kwargs: Any) -> Any:
        hashed.append(fd)
        return real_hash_fd(fd, *args, **kwargs)

    monkeypatch.setattr(scan_module, "hash_fd", counting)
    tree = tmp_path / "tree"
    files = generate(tree)
    # The stat cache refuses entries for files modified within 2 s of hashing (racy).
    time.sleep(2.1)
    sqlite_cli("register", "drive/a", str(tree), "--chunk-size", "1MiB")
    assert len(hashed) == files
    hashed.clear()
    mutate(tree)  # rewrites one file, appends to one, adds one, removes one
    sqlite_cli("register", "drive/a", str(tree), "--chunk-size", "1MiB")
    assert len(hashed) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "drive/none@latest"], "unknown dataset 'drive/none'"),
        (["show", "not a name"], "invalid dataset name"),
        (["register", "drive/a", "az://acct/c/p"], "container name 'c' is too short"),
        (["register", "drive/a", "nosite:x/y"], "there is no site named 'nosite'"),
        (["register", "drive/a", "/no/such/dir"], "not a directory"),
        (["register", "drive/a", "/tmp", "--chunk-size", "12 parsecs"], "bad size"),
        (["register", "drive/a", "/tmp", "--chunk-size", "1KiB"], "chunk size 1024 out of range"),
        (["register", "drive/a"], "exactly one SOURCE"),
        (["register", "drive/a", "/tmp", "--label", "bad label"], "invalid label"),
        (["export", "drive/a@latest", "--json"], "--json needs --output"),
        (["diff", "drive/a@x", "drive/a@y"], "unknown dataset"),
    ],
)
def test_errors_are_one_line_on_stderr_with_exit_code_2(
    sqlite_cli: Invoke, args: list[str], message: str
) -> None:
    result = sqlite_cli(*args, code=2)
    assert result.stdout == ""
    assert result.stderr.startswith("datasync: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_parse_size_units() -> None:
    assert parse_size("64MiB") == parse_size("64M") == parse_size("64mib") == 64 * 2**20
    assert parse_size("1GiB") == 2**30 and parse_size("512KiB") == 512 * 1024
    assert parse_size("64MB") == 64_000_000 and parse_size("1048576") == 2**20
    with pytest.raises(UserError):
        parse_size("-1M")


def test_console_script_prints_one_json_object_and_no_progress_bar(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    generate(tree)
    exe = Path(sys.executable).with_name("datasync")
    env = {**os.environ, "DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": ""}
    done = subprocess.run(
        [str(exe), "register", "drive/sub", str(tree), "--chunk-size", "1MiB", "--json"],
        capture_output=True,
        env=env,
        check=True,
        timeout=300,
    )
    assert done.stderr == b""
    assert set(json.loads(done.stdout)) >= {"version_id", "files", "bytes", "created"}
    failed = subprocess.run(
        [str(exe), "show", "drive/sub@nope"], capture_output=True, env=env, timeout=300
    )
    assert failed.returncode == 2 and failed.stdout == b""
    assert failed.stderr.decode().startswith("datasync: error: drive/sub@nope: no label")


def test_progress_bar_is_drawn_on_a_terminal(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    generate(tree)
    exe = Path(sys.executable).with_name("datasync")
    env = {
        **os.environ,
        "DATASYNC_HOME": str(tmp_path / "home"),
        "DATASYNC_DATABASE_URL": "",
        "TERM": "xterm",
        "COLUMNS": "160",
    }
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(exe), "register", "drive/tty", str(tree), "--chunk-size", "1MiB"],
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = out.decode(errors="replace")
    assert "hashing" in text and "files" in text
    assert "registered drive/tty@" in text


def test_an_unreachable_database_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nowhere"
    cli = _invoker({"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": url})
    result = cli("versions", "drive/a", code=2)
    assert result.stderr.startswith("datasync: error: cannot open database postgresql")
    assert "s3cret" not in result.stderr and result.stderr.count("\n") == 1
