"""Bad input found by trying datasync as a new user would (issue 13, item 6).

Each case gets one line, ``datasync: error: ...``, and exit 2 from the CLI (HTTP 4xx with a
JSON ``error`` where the API has the same call), and changes nothing: the row counts of
the manifest tables, placements and tasks are compared before and after. The exceptions
are stated where they are: a placement that FAILED at plan time exits 1 with its reason,
and Ctrl-C while waiting leaves the placement queued, as it should.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from datasync.api import API_PREFIX
from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.config import load_settings
from tests.integration.api_helpers import admin_client
from tests.integration.manifest_helpers import TABLES as MANIFEST_TABLES
from tests.integration.manifest_helpers import counts as table_counts
from tests.integration.manifest_helpers import row, write_producer

DATASYNC = Path(sys.executable).parent / "datasync"
# The manifest tables, and what a replication writes first.
TABLES = (*MANIFEST_TABLES, "placements", "tasks")


@dataclass
class World:
    app: App
    client: TestClient
    env: dict[str, str]
    url: str
    tmp: Path
    v1: str  # version id of drive/a@v1 (a producer manifest: no location)
    b1: str  # version id of drive/b@v1 (registered under the pipeline site)

    def cli(self, *args: str, code: int = 2, **env: str) -> tuple[str, str]:
        result = CliRunner().invoke(cli_app, list(args), env={**self.env, **env})
        assert "Traceback" not in result.output, result.output
        assert result.exit_code == code, (result.exit_code, result.output)
        return result.stdout, result.stderr

    def refused(self, *args: str, **env: str) -> str:
        """Run a command that must be refused: exit 2, one line, nothing changed."""
        before = table_counts(self.url, TABLES)
        out, err = self.cli(*args, code=2, **env)
        assert out == ""
        assert err.startswith("datasync: error: ") and err.count("\n") == 1, err
        assert table_counts(self.url, TABLES) == before
        return err

    def api_refused(
        self, method: str, path: str, status: int | tuple[int, ...], **kwargs: Any
    ) -> str:
        before = table_counts(self.url, TABLES)
        response = self.client.request(method, f"{API_PREFIX}{path}", **kwargs)
        expected = status if isinstance(status, tuple) else (status,)
        assert response.status_code in expected, response.text
        assert table_counts(self.url, TABLES) == before
        return str(response.json()["error"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    (tmp_path / "lustre").mkdir()
    run = tmp_path / "pipeline" / "run-1"
    run.mkdir(parents=True)
    (run / "a.bin").write_bytes(b"a" * 1000)
    (run / "b.bin").write_bytes(b"b" * 2000)
    config = tmp_path / "datasync.toml"
    config.write_text(
        f"[sites.lustre]\nurl = '{tmp_path / 'lustre'}'\n"
        f"[sites.pipeline]\nurl = '{tmp_path / 'pipeline'}'\n"
    )
    url = f"sqlite:///{tmp_path / 'home' / 'datasync.db'}"
    env = {
        "DATASYNC_HOME": str(tmp_path / "home"),
        "DATASYNC_DATABASE_URL": url,
        "DATASYNC_CONFIG": str(config),
    }
    with bootstrap(load_settings(env=env)) as app, admin_client(app) as client:
        manifest = write_producer(tmp_path / "a.jsonl", [row("ok/a.bin"), row("ok/b.bin", 2)])
        v1 = app.service.register_manifest("drive/a", manifest, label="v1").version_id
        b1 = app.service.register_directory("drive/b", run, label="v1").version_id
        yield World(app, client, env, url, tmp_path, v1, b1)


# -- priorities and deadlines ---------------------------------------------------------------


@pytest.mark.parametrize("priority", ["-99999999999999999999", "99999999999999999999", "1000001"])
def test_an_absurd_priority_is_refused_before_any_write(world: World, priority: str) -> None:
    err = world.refused("replicate", "drive/b@v1", "--to", "lustre", "--priority", priority)
    assert f"priority {priority} is out of range: use -1000000 to 1000000" in err
    body = {"ref": "drive/b@v1", "site": "lustre", "priority": int(priority)}
    # The request schema bounds it (422, naming the bound) or the service does (400).
    message = world.api_refused("POST", "/placements", (400, 422), json=body)
    assert any(bound in message for bound in ("out of range", "1000000", "214748364"))


def test_the_largest_priority_is_accepted(world: World) -> None:
    out, _ = world.cli("replicate", "drive/b@v1", "--to", "lustre", "--priority", "1000000", code=0)
    assert "drive/b@" in out


@pytest.mark.parametrize("deadline", ["+99999999999d", "9999-06-01", "0001-01-01T00:00+01:00"])
def test_a_deadline_no_calendar_holds_is_refused(world: World, deadline: str) -> None:
    err = world.refused("replicate", "drive/b@v1", "--to", "lustre", "--deadline", deadline)
    assert f"bad deadline {deadline!r}" in err
    body = {"ref": "drive/b@v1", "site": "lustre", "deadline": deadline}
    assert "bad deadline" in world.api_refused("POST", "/placements", 400, json=body)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[sites.x]\nurl = 'data/out'\n", "sites.x.url: 'data/out' is a relative path"),
        ("[sites.x]\nurl = 's4://bucket/prefix'\n", "sites.x.url: unknown storage URL scheme"),
        ("[sites.x]\nurl = '{lustre}/inner'\n", "site 'x' has a root inside that of site 'lustre'"),
        ("[sites.x]\nurl = 'file://{lustre}'\n", "has the same root as site"),
        ("[sites.x]\nurl = '/x'\nconcurrency = 0\n", "sites.x.concurrency: Input should be"),
    ],
)
def test_config_mistakes_are_refused_by_every_command(
    world: World, table: str, message: str
) -> None:
    config = Path(world.env["DATASYNC_CONFIG"])
    config.write_text(config.read_text() + table.format(lustre=world.tmp / "lustre"))
    for args in (["sites"], ["datasets"], ["status"]):
        assert message in world.refused(*args)


def test_a_mistyped_sqlite_url_is_not_created_by_commands_that_read(world: World) -> None:
    typo = world.tmp / "home" / "datasnyc.db"
    url = f"sqlite:///{typo}"
    for args in (["datasets"], ["versions", "drive/a"], ["status"], ["show", "drive/a@v1"]):
        err = world.refused(*args, DATASYNC_DATABASE_URL=url)
        assert f"no database at {typo}" in err and "typo" in err
    assert not typo.exists()
    relative = world.refused("datasets", DATASYNC_DATABASE_URL="sqlite:///home/datasync.db")
    assert "four slashes: sqlite:////home/datasync.db" in relative
    nowhere = world.tmp / "no-such-dir" / "ds.db"
    err = world.refused(
        "register",
        "drive/c",
        str(world.tmp / "pipeline"),
        DATASYNC_DATABASE_URL=f"sqlite:///{nowhere}",
    )
    assert f"directory {nowhere.parent} of the database" in err
    assert not nowhere.parent.exists()


# -- references and labels ------------------------------------------------------------------


def test_a_prefix_shorter_than_the_minimum_says_so(world: World) -> None:
    err = world.refused("show", f"drive/a@{world.v1[:3]}")
    assert f"id prefix {world.v1[:3]!r} is too short: give at least 4 hex digits" in err
    out, _ = world.cli("show", f"drive/a@{world.v1[:4]}", code=0)
    assert world.v1 in out


@pytest.mark.parametrize("label", ["beef", "2026", "0123456789"])
def test_labels_that_look_like_id_prefixes_are_refused(world: World, label: str) -> None:
    assert "looks like a version id prefix" in world.refused("label", "drive/a@v1", label)
    body = {"ref": "drive/a@v1", "label": label}
    assert "looks like a version id prefix" in world.api_refused("PUT", "/labels", 400, json=body)


def test_labels_like_v1_and_dates_still_work(world: World) -> None:
    for label in ("v2", "2026-11-20", "release_7"):
        out, _ = world.cli("label", "drive/a@v1", label, code=0)
        assert out.strip() == f"drive/a@{label} -> {world.v1}"


def test_ids_come_before_an_older_label_of_the_same_form(world: World) -> None:
    """A hex label made before labels of that form were refused cannot shadow an id."""
    manifest = write_producer(world.tmp / "a2.jsonl", [row("ok/c.bin", 3)])
    v2 = world.app.service.register_manifest("drive/a", manifest).version_id
    prefix = v2[:6]
    unused = next(
        p for p in ("ffff", "eeee", "dddd") if not world.v1.startswith(p) and not v2.startswith(p)
    )
    with world.app.engine.begin() as conn:
        dataset, version = conn.execute(
            sa.text(
                "SELECT d.pk, v.pk FROM datasets d JOIN versions v ON v.dataset_pk = d.pk"
                " WHERE d.name = 'drive/a' AND v.version_id = :v"
            ),
            {"v": world.v1},
        ).one()
        for name in (prefix, unused):
            conn.execute(
                sa.text(
                    "INSERT INTO labels (dataset_pk, name, version_pk, updated_at)"
                    " VALUES (:d, :n, :v, CURRENT_TIMESTAMP)"
                ),
                {"d": dataset, "n": name, "v": version},
            )
    assert world.app.service.show(f"drive/a@{prefix}").version_id == v2  # the id wins
    assert world.app.service.show(f"drive/a@{unused}").version_id == world.v1  # no id: label


# -- empty sources --------------------------------------------------------------------------


def test_an_empty_or_unmounted_directory_is_refused_unless_allowed(world: World) -> None:
    mount_point = world.tmp / "pipeline" / "mnt"  # an empty mount point looks like this
    mount_point.mkdir()
    err = world.refused("register", "drive/b", str(mount_point))
    assert "no files to register" in err and "not mounted" in err and "--allow-empty" in err
    assert world.app.service.show("drive/b@latest").version_id == world.b1
    via = world.api_refused(
        "POST", "/datasets/drive/b/versions/directory", 400, json={"path": str(mount_point)}
    )
    assert "no files to register" in via
    empty = write_producer(world.tmp / "empty.jsonl", [])
    assert "lists no files" in world.refused("register", "drive/b", "--manifest", str(empty))
    out, _ = world.cli("register", "drive/b", str(mount_point), "--allow-empty", "--json", code=0)
    assert '"files": 0' in out
    assert world.app.service.show("drive/b@latest").files == 0


# -- status and sites -----------------------------------------------------------------------


def test_status_filters_must_name_something_real(world: World) -> None:
    assert "unknown site 'nosite' (sites: lustre, pipeline)" in world.refused(
        "status", "--site", "nosite"
    )
    assert "invalid dataset name 'BAD NAME'" in world.refused("status", "--dataset", "BAD NAME")
    assert "unknown site" in world.api_refused("GET", "/placements?site=nosite", 400)
    assert "invalid dataset name" in world.api_refused("GET", "/placements?dataset=BAD%20NAME", 400)
    out, _ = world.cli("status", "--all", "--site", "lustre", "--dataset", "drive/b", code=0)
    assert out.startswith("no placements")


@pytest.mark.parametrize("timeout", ["-1", "0", "nan"])
def test_sites_refuses_a_timeout_that_is_not_a_duration(world: World, timeout: str) -> None:
    assert "give a number of seconds above 0" in world.refused("sites", "--timeout", timeout)


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_port_in_use_is_refused_before_anything_starts(world: World, command: str) -> None:
    with _listening() as taken:
        port = taken.getsockname()[1]
        start = time.monotonic()
        args = [str(DATASYNC), command, "--port", str(port)]
        done = subprocess.run(
            args + (["--processes", "1"] if command == "up" else []),
            env={**os.environ, **world.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"datasync: error: cannot listen on 127.0.0.1:{port}: Address already in use (another"
        " datasync serve/up, or another program? pick one with --port)\n"
    )
    assert "stopped" not in done.stderr and time.monotonic() - start < 60


# -- replicate: its exit code and Ctrl-C ----------------------------------------------------


def test_replicate_exits_1_when_the_placement_failed_at_plan_time(world: World) -> None:
    # drive/a@v1 is a producer manifest: nobody said where its files are.
    out, err = world.cli("replicate", "drive/a@v1", "--to", "lustre", code=1)
    assert ": FAILED" in out
    assert err.startswith("datasync: error: placement #") and "FAILED: " in err
    assert "have no usable replica at any configured site" in err and err.count("\n") == 1
    world.cli("replicate", "drive/a@v1", "--to", "lustre", "--json", code=1)


def _interactive_ctrl_c() -> None:
    """In the child before exec: Ctrl-C as at a terminal. A test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then leaves
    it ignored: no KeyboardInterrupt would ever reach the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_waiting_says_the_placement_stays_queued(world: World) -> None:
    proc = subprocess.Popen(
        [str(DATASYNC), "replicate", "drive/b@v1", "--to", "lustre", "--wait"],
        env={**os.environ, **world.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interactive_ctrl_c,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # a progress line: it is waiting for workers
    assert "drive/b@" in first and "TRANSFERRING" in first, first
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    (placement,) = world.app.replication.status(dataset="drive/b")
    assert rest.splitlines()[-1] == (
        f"datasync: error: stopped waiting; placement #{placement.id} stays queued and workers"
        f" carry on: `datasync status` or `datasync explain drive/b@{world.b1[:12]} --site"
        " lustre` shows it"
    )
    assert "nothing was registered" not in rest
    assert placement.state == "TRANSFERRING" and placement.tasks.get("queued", 0) > 0
