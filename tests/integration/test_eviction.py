"""Quotas, eviction and policies on SQLite and PostgreSQL, against real POSIX sites.

Eviction never removes pinned data, frees least-recently-used views first, keeps blobs
another view still uses, and says so when a placement cannot fit. Policies place new
versions at once, pin the newest ones, and let older ones go. Every surviving view is
hashed with ``xxh128sum``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col
from typer.testing import CliRunner

from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.config import SiteConfig
from datasync.db.ops_tables import PlacementHistory
from datasync.placement.policies import RETRY_LIMIT
from datasync.transfer.layout import blob_key
from datasync.transfer.supervisor import WorkerOptions, run_until_idle
from tests.fixtures.replication import Site, posix_site, settings_for, xxh
from tests.integration.test_integrity import _env, assert_posix_view

FAST = WorkerOptions(queue_backoff_base=0.0, idle_sleep=0.05, lease_seconds=30)
KIB = 1024


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site]:
    return posix_site("pipeline", tmp_path / "pipeline"), posix_site("lustre", tmp_path / "lustre")


def _app(tmp_path: Path, db_url: str, sites: tuple[Site, Site], quota: int | None) -> App:
    pipeline, lustre = sites
    settings = settings_for(tmp_path / "home", db_url, [pipeline, lustre])
    limited = SiteConfig(url=lustre.config.url, quota_bytes=quota)
    return bootstrap(settings.model_copy(update={"sites": {**settings.sites, "lustre": limited}}))


@pytest.fixture
def versions(sites: tuple[Site, Site]) -> dict[str, dict[str, bytes]]:
    """Three versions of ~120 KiB, sharing one 40 KiB file."""
    pipeline, _ = sites
    assert pipeline.root is not None
    shared = os.urandom(40 * KIB)
    out = {}
    for name in ("a", "b", "c"):
        files = {"shared.bin": shared, f"{name}.bin": os.urandom(80 * KIB)}
        for path, data in files.items():
            (pipeline.root / name).mkdir(exist_ok=True)
            (pipeline.root / name / path).write_bytes(data)
        out[name] = files
    return out


def _place(app: App, name: str, pipeline: Site) -> str:
    assert pipeline.root is not None
    v = app.service.register(f"drive/{name}", str(pipeline.root / name))
    st = app.replication.replicate(f"drive/{name}@{v.version_id}", "lustre")
    run_until_idle(app.settings, [st.id], options=FAST)
    assert app.replication.status(placement_id=st.id)[0].state == "READY"
    return v.version_id


def test_eviction_frees_lru_unpinned_views_and_keeps_shared_blobs(
    tmp_path: Path, db_url: str, sites: tuple[Site, Site], versions: dict[str, dict[str, bytes]]
) -> None:
    pipeline, lustre = sites
    assert lustre.root is not None
    app = _app(tmp_path, db_url, sites, quota=300 * KIB)
    try:
        va = _place(app, "a", pipeline)  # used least recently
        vb = _place(app, "b", pipeline)
        app.staging.stage(f"drive/a@{va}", "lustre", job_id="train-1")  # pins a, uses it
        # c needs 80 KiB more: 200 used + 80 > 300? no. Make the quota tighter now.
        assert app.evictor.usage("lustre") == 40 * KIB + 2 * 80 * KIB
        tight = SiteConfig(url=lustre.config.url, quota_bytes=230 * KIB)
    finally:
        app.close()
    app = bootstrap(
        app.settings.model_copy(update={"sites": {**app.settings.sites, "lustre": tight}})
    )
    try:
        plan = app.evictor.plan("lustre", need=80 * KIB)
        assert [c.ref for c in plan.evict] == [f"drive/b@{vb}"], "a is pinned, b goes"
        assert plan.evict[0].frees == 80 * KIB, "the shared blob stays: a still needs it"
        assert plan.pinned == [f"drive/a@{va}"]
        vc = _place(app, "c", pipeline)  # makes room by itself at planning time
        states = {p.dataset: p.state for p in app.replication.status()}
        assert states == {"drive/a": "READY", "drive/b": "EVICTED", "drive/c": "READY"}
        assert not (lustre.root / "drive/b" / vb).exists()
        assert not (lustre.root / blob_key("xxh3-128:" + xxh(versions["b"]["b.bin"]))).exists()
        assert (lustre.root / blob_key("xxh3-128:" + xxh(versions["b"]["shared.bin"]))).exists()
        assert_posix_view(lustre.root, "drive/a", va, versions["a"])
        assert_posix_view(lustre.root, "drive/c", vc, versions["c"])
        # Evicted data comes back on demand.
        app.staging.release("train-1")
        st = app.replication.replicate(f"drive/b@{vb}", "lustre")
        run_until_idle(app.settings, [st.id], options=FAST)
        assert app.replication.status(placement_id=st.id)[0].state == "READY"
        assert_posix_view(lustre.root, "drive/b", vb, versions["b"])
        assert {p.dataset: p.state for p in app.replication.status()}["drive/a"] == "EVICTED"
    finally:
        app.close()


def test_a_placement_that_cannot_fit_says_so(
    tmp_path: Path, db_url: str, sites: tuple[Site, Site], versions: dict[str, dict[str, bytes]]
) -> None:
    pipeline, _lustre = sites
    app = _app(tmp_path, db_url, sites, quota=150 * KIB)
    try:
        va = _place(app, "a", pipeline)
        app.staging.stage(f"drive/a@{va}", "lustre", job_id="keep")
        assert pipeline.root is not None
        vb = app.service.register("drive/b", str(pipeline.root / "b"))
        st = app.replication.replicate(f"drive/b@{vb.version_id}", "lustre")
        assert st.state == "FAILED"
        assert st.error is not None and "cannot fit" in st.error and "drive/a@" in st.error
        result = CliRunner().invoke(
            cli_app, ["gc", "lustre", "--dry-run", "--json"], env=_env(app), catch_exceptions=False
        )
        doc: dict[str, Any] = json.loads(result.stdout)
        assert doc["evict"] == [] and doc["pinned"] == [f"drive/a@{va}"] and not doc["done"]
    finally:
        app.close()


@pytest.fixture
def policy_app(tmp_path: Path, db_url: str, sites: tuple[Site, Site]) -> Iterator[tuple[App, Path]]:
    app = _app(tmp_path, db_url, sites, quota=1024 * KIB)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[policy]]\nname = "drive-train"\ndatasets = ["drive/*"]\nsites = ["lustre"]\n'
        "keep_last = 1\npriority = 3\n"
    )
    try:
        yield app, policy
    finally:
        app.close()


def test_a_policy_places_new_versions_at_once_and_lets_old_ones_go(
    policy_app: tuple[App, Path], sites: tuple[Site, Site], versions: dict[str, dict[str, bytes]]
) -> None:
    app, policy = policy_app
    pipeline, lustre = sites
    assert pipeline.root is not None and lustre.root is not None
    result = CliRunner().invoke(
        cli_app, ["policy", "check", str(policy), "--json"], env=_env(app), catch_exceptions=False
    )
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["name"] == "drive-train"
    assert app.replication.status() == [], "check changes nothing"
    app.policies.apply(policy)
    v1 = app.service.register("drive/x", str(pipeline.root / "a"))  # placed at once
    (p1,) = app.replication.status(dataset="drive/x")
    assert p1.version_id == v1.version_id and p1.priority == 3
    run_until_idle(app.settings, options=FAST)
    v2 = app.service.register("drive/x", str(pipeline.root / "b"))
    run_until_idle(app.settings, options=FAST)
    by_version = {p.version_id: p for p in app.replication.status(dataset="drive/x")}
    assert {p.state for p in by_version.values()} == {"READY"}
    assert_posix_view(lustre.root, "drive/x", v2.version_id, versions["b"])
    why1 = app.explainer.explain(by_version[v1.version_id].id)
    why2 = app.explainer.explain(by_version[v2.version_id].id)
    assert why1.pins == [] and why2.pins == ["policy:drive-train"], "keep_last = 1"
    plan = app.evictor.plan("lustre", need=10**12)
    assert [c.ref for c in plan.evict] == [f"drive/x@{v1.version_id}"]
    assert plan.pinned == [f"drive/x@{v2.version_id}"]


def test_a_failed_policy_placement_is_retried_with_backoff_then_left_to_a_person(
    policy_app: tuple[App, Path], sites: tuple[Site, Site], versions: dict[str, dict[str, bytes]]
) -> None:
    app, policy = policy_app
    pipeline, _lustre = sites
    assert pipeline.root is not None
    app.policies.apply(policy)
    app.service.register("drive/y", str(pipeline.root / "a"))
    (st,) = app.replication.status(dataset="drive/y")

    def fail_and_age(minutes: float) -> None:
        app.state.placements.fail(st.id, "the source went bad")
        with app.engine.begin() as conn:  # as if the failure happened `minutes` ago
            conn.execute(
                sa.update(PlacementHistory)
                .where(col(PlacementHistory.placement_id) == st.id)
                .values(at=datetime.now(UTC) - timedelta(minutes=minutes))
            )

    def state() -> str:
        return str(app.replication.status(placement_id=st.id)[0].state)

    fail_and_age(1)
    app.policies.evaluate()
    assert state() == "FAILED", "retried one minute after the first failure"
    fail_and_age(11)  # past the first backoff (10 min)
    app.policies.evaluate()
    assert state() != "FAILED", "not retried after the backoff"
    ref = f"drive/y@{st.version_id}"
    for _ in range(RETRY_LIMIT - 2):  # two failures so far; each retry fails again
        fail_and_age(60 * 48)
        app.replication.replicate(ref, "lustre")
    fail_and_age(60 * 48)
    app.policies.evaluate()
    assert state() == "FAILED", "a policy keeps retrying a placement that failed 6 times"
    # A person still can: replicate retries at once.
    assert app.replication.replicate(ref, "lustre").state != "FAILED"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[[policy]]\nname = "p"\ndatasets = ["x/*"]\nsites = ["mars"]\n', "unknown site"),
        ('[[policy]]\nname = "p"\ndatasets = []\nsites = ["lustre"]\n', "datasets"),
        ('[[policy]]\nname = "p"\ndatasets = ["x"]\nsites = ["lustre"]\nkeep = 2\n', "keep"),
        ("not toml [", "not TOML"),
    ],
)
def test_bad_policy_files_are_refused_with_the_reason_and_change_nothing(
    policy_app: tuple[App, Path], tmp_path: Path, text: str, why: str
) -> None:
    app, _policy = policy_app
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = CliRunner().invoke(cli_app, ["policy", "apply", str(bad)], env=_env(app))
    assert result.exit_code == 2 and why in result.stderr, result.stderr
    assert app.policies.list() == []
