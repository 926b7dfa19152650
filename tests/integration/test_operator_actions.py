"""Operator actions: pause and resume a site, retry a placement, through the CLI, against
the production claim statement, on SQLite and PostgreSQL (the API routes are in the role
matrix, ``test_auth_matrix.py``).

A pause must hold every task of the site, planned before or after it, as destination or
as source, and nothing else; resume must release them at the next claim; retry must plan
a FAILED placement anew and make backing-off tasks due now.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from datasync.api.app import create_app
from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.config import load_settings
from datasync.errors import TransientError
from datasync.transfer.worker import pending_tasks
from tests.fixtures.transfer import FixedRetry, make_state

SITES = ("pipeline", "lustre", "other")


@dataclass
class World:
    app: App
    env: dict[str, str]
    placements: dict[str, int]  # destination site -> placement id

    def cli(self, *args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli_app, list(args), env=self.env)
        assert result.exit_code == code, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        return result.stdout if code == 0 else result.stderr

    def claim(self, owner: str = "w") -> set[str]:
        """Claim what a worker could now; the destination sites of what it got."""
        site_of = {pid: site for site, pid in self.placements.items()}
        return {
            site_of[t.placement_id] for t in make_state(self.app.engine).tasks.claim(owner, 100, 60)
        }

    def phase(self, site: str) -> str:
        return self.app.replication.status(placement_id=self.placements[site])[0].phase


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    for name in SITES:
        (tmp_path / name).mkdir()
    config = tmp_path / "datasync.toml"
    config.write_text("".join(f'[sites.{n}]\nurl = "{tmp_path / n}"\n' for n in SITES))
    env = {
        "DATASYNC_HOME": str(tmp_path / "home"),
        "DATASYNC_DATABASE_URL": db_url,
        "DATASYNC_CONFIG": str(config),
    }
    run = tmp_path / "pipeline" / "run1"
    run.mkdir()
    for i in range(3):
        (run / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    registered = CliRunner().invoke(cli_app, ["register", "drive/a", str(run), "-l", "v1"], env=env)
    assert registered.exit_code == 0, registered.output
    with bootstrap(load_settings(env=env)) as app:
        world = World(app, env, {})
        for site in ("lustre", "other"):
            out = world.cli("replicate", "drive/a@v1", "--to", site, "--json")
            world.placements[site] = json.loads(out)["id"]
        yield world


def test_a_paused_destination_holds_its_tasks_and_only_its_tasks(world: World) -> None:
    out = world.cli("pause", "lustre", "--reason", "OST maintenance", "--until", "+2h")
    assert out.startswith("lustre: paused until ")
    assert world.phase("lustre").startswith("site lustre paused by local until ")
    assert world.phase("lustre").split(";")[0].endswith(": OST maintenance")
    assert "paused" not in world.phase("other")
    assert world.claim() == {"other"}  # lustre's queued tasks are not claimable
    # Still pending, as tasks backing off are: `worker --once` waits for the pause to end.
    assert pending_tasks(world.app.engine, [world.placements["lustre"]]) > 0
    sites = {s["name"]: s for s in json.loads(world.cli("sites", "--no-probe", "--json"))}
    assert sites["lustre"]["pause_reason"] == "OST maintenance"
    assert sites["other"]["paused_until"] is None
    with TestClient(create_app(world.app)) as client:  # /metrics says so too
        text = client.get("/metrics").text
    assert 'datasync_site_paused{site="lustre"} 1.0' in text
    assert 'datasync_site_paused{site="other"} 0.0' in text
    # Tasks planned while the pause holds wait too: a new version to the paused site.
    run2 = Path(world.app.settings.sites["pipeline"].url) / "run2"
    run2.mkdir()
    (run2 / "new.bin").write_bytes(b"n" * 5000)
    world.cli("register", "drive/a", str(run2), "-l", "v2")
    v2 = json.loads(world.cli("replicate", "drive/a@v2", "--to", "lustre", "--json"))
    assert v2["state"] == "TRANSFERRING"
    assert world.claim() == set()
    assert world.cli("resume", "lustre") == "lustre: resumed\n"
    site_of = {pid: site for site, pid in world.placements.items()}
    released = make_state(world.app.engine).tasks.claim("w", 100, 60)
    assert {site_of.get(t.placement_id, "v2") for t in released} == {"lustre", "v2"}
    assert world.cli("resume", "lustre") == "lustre: was not paused\n"


def test_a_paused_source_holds_the_tasks_that_read_from_it(world: World) -> None:
    world.cli("pause", "pipeline", "--reason", "array rebuild")
    assert world.claim() == set()  # both placements read from pipeline
    world.cli("resume", "pipeline")
    assert world.claim() == {"lustre", "other"}


def test_a_pause_ends_by_itself(world: World) -> None:
    world.cli("pause", "lustre", "--reason", "short", "--until", "+1s")
    assert world.claim() == {"other"}
    import time

    time.sleep(1.5)
    assert world.claim() == {"lustre"}


def test_retry_makes_backing_off_tasks_due_now_and_replans_a_failed_placement(
    world: World,
) -> None:
    slow = make_state(world.app.engine, retry=FixedRetry(3600)).tasks
    for task in slow.claim("w", 100, 60):
        slow.fail("w", task.id, TransientError("connection reset"))
    assert world.claim() == set()  # every task backs off for an hour
    done = json.loads(world.cli("retry", "drive/a@v1", "--site", "lustre", "--json"))
    assert done["state"] == "TRANSFERRING"
    assert world.claim() == {"lustre"}  # only the placement retried
    # A FAILED placement is planned anew; its reason is history, not its state.
    make_state(world.app.engine).placements.fail(world.placements["other"], "gave up")
    assert world.app.replication.status(placement_id=world.placements["other"])[0].state == "FAILED"
    again = json.loads(world.cli("retry", "drive/a@v1", "--site", "other", "--json"))
    assert again["id"] == world.placements["other"] and again["state"] == "TRANSFERRING"
    assert world.claim() == {"other"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pause", "mars", "--reason", "x"), "unknown site 'mars'"),
        (("pause", "lustre", "--reason", "  "), "say why the site is paused"),
        (("pause", "lustre", "--reason", "x", "--until", "2001-01-01"), "not in the future"),
        (("pause", "lustre", "--reason", "x", "--until", "soon"), "bad deadline 'soon'"),
        (("pause", "lustre", "--reason", "x", "--until", ""), "give the pause an end"),
        (("resume", "mars"), "unknown site 'mars'"),
        (("retry", "drive/a@v1", "--site", "pipeline"), "has no placement at 'pipeline'"),
        (("retry", "drive/nope@v1", "--site", "lustre"), "drive/nope"),
    ],
)
def test_bad_operator_input_is_one_line_and_changes_nothing(
    world: World, args: tuple[str, ...], message: str
) -> None:
    err = world.cli(*args, code=2)
    assert err.startswith("datasync: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert world.claim() == {"lustre", "other"}  # no pause was recorded
