"""The dashboard in a real browser: headless Debian Chromium driven by Playwright.

``datasync serve`` (SQLite) serves ``/ui``; three placements are recorded before any
worker runs: a version to an S3 site (moto), the same version to a POSIX site, and a
version whose source file was rewritten after registration (an injected failure). The
page is loaded, then ``datasync worker`` starts. Without reloading, the page must show
the S3 placement's progress advancing through intermediate values to READY, the broken
placement FAILED with its reason (the file and "no good source"), the error in the
recent-errors table, a line per link in the throughput legend, and an explain panel for
the failed placement. A screenshot taken mid-replication is kept in the test's tmp dir
(and copied to ``$DATASYNC_DASHBOARD_SCREENSHOT`` when set: that is how
``docs/dashboard.png`` is made).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.fixtures.emulators import S3_KEYS, unique_name
from tests.integration.api_helpers import served_admin_token
from tests.observe.servers import (
    Daemon,
    datasync_env,
    free_port,
    make_files,
    run_json,
    start,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.emulator]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed: make system-deps (Debian package chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            yield page
        finally:
            browser.close()


@pytest.fixture
def world(tmp_path: Path, moto_server: str) -> Iterator[dict[str, Any]]:
    home = tmp_path / "home"
    pipeline, lustre = tmp_path / "pipeline", tmp_path / "lustre"
    pipeline.mkdir()
    lustre.mkdir()
    bucket = unique_name("dash")
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **S3_KEYS).create_bucket(
        Bucket=bucket
    )
    s3 = {
        "url": f"s3://{bucket}",
        "options": {"endpoint_url": moto_server, "region_name": "us-east-1", **S3_KEYS},
    }
    write_config(home, {"pipeline": str(pipeline), "lustre": str(lustre), "s3": s3})
    env = datasync_env(home, f"sqlite:///{home / 'datasync.db'}")
    daemons: list[Daemon] = []
    try:
        yield {"env": env, "pipeline": pipeline, "tmp": tmp_path, "daemons": daemons}
    finally:
        for daemon in daemons:
            daemon.stop()


def _pct(page: Any, placement: int) -> tuple[float, str]:
    row = page.locator(f'tr[data-placement-id="{placement}"]')
    if row.count() == 0:
        return -1.0, ""
    return float(row.locator(".bar").get_attribute("data-pct") or -1), str(
        row.get_attribute("data-state")
    )


def test_dashboard_shows_progress_failure_and_explain(
    world: dict[str, Any], browser_page: Any
) -> None:
    env, pipeline, tmp = world["env"], world["pipeline"], world["tmp"]
    make_files(pipeline / "run1", 1200, 20_000, 80_000, seed=3)
    run_json(env, "register", "drive/tokyo", str(pipeline / "run1"), "--label", "v1")
    broken = make_files(pipeline / "broken", 12, 1_000, 5_000, seed=4)
    run_json(env, "register", "drive/broken", str(pipeline / "broken"), "--label", "v1")
    victim = sorted(broken)[3]
    (pipeline / "broken" / victim).write_bytes(b"x" * len(broken[victim]))  # same size, other bytes

    port = free_port()
    serve = start(env, tmp / "serve.log", "serve", port=port)
    world["daemons"].append(serve)
    api = f"{serve.url}/api/v1"
    admin = {"Authorization": f"Bearer {served_admin_token(Path(env['DATASYNC_HOME']))}"}
    ops = httpx.post(
        f"{api}/tokens", json={"name": "dashboard", "role": "ops"}, headers=admin, timeout=60
    )
    assert ops.status_code in (200, 201), ops.text
    ids = {}
    for ref, site in (
        ("drive/tokyo@v1", "s3"),
        ("drive/tokyo@v1", "lustre"),
        ("drive/broken@v1", "lustre"),
    ):
        r = httpx.post(
            f"{api}/placements", json={"ref": ref, "site": site}, headers=admin, timeout=60
        )
        assert r.status_code == 200, r.text
        ids[(ref, site)] = r.json()["id"]
    to_s3, failing = ids[("drive/tokyo@v1", "s3")], ids[("drive/broken@v1", "lustre")]

    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{serve.url}/ui?refresh=250")
    # Signed out, the page shows no data and asks for a token; a wrong one is refused.
    page.wait_for_selector("#signin:not([hidden])", timeout=30_000)
    assert page.locator(f'tr[data-placement-id="{to_s3}"]').count() == 0
    page.fill("#token", "not-a-token")
    page.click("#signin-button")
    page.wait_for_function(
        "document.getElementById('signin-note').textContent.includes('invalid token')",
        timeout=30_000,
    )
    page.fill("#token", ops.json()["token"])
    page.click("#signin-button")
    page.wait_for_selector(f'tr[data-placement-id="{to_s3}"]', timeout=30_000)
    assert _pct(page, to_s3)[0] == 0.0
    refreshes = int(page.evaluate("document.body.dataset.refreshes"))

    worker = start(env, tmp / "worker.log", "worker", "--log-level", "INFO", ready=None)
    world["daemons"].append(worker)
    seen: list[float] = []
    shot = tmp / "dashboard.png"
    deadline = time.monotonic() + 240
    while True:
        pct, state = _pct(page, to_s3)
        if not seen or pct != seen[-1]:
            seen.append(pct)
        if 45 < pct < 90 and not shot.exists():
            page.wait_for_timeout(400)  # one more refresh: the chart has two points
            page.screenshot(path=str(shot), full_page=True)
        if state == "READY":
            break
        assert worker.proc.poll() is None, worker.tail()
        assert time.monotonic() < deadline, (seen, worker.tail())
        page.wait_for_timeout(50)
    # The page refreshed itself (never reloaded) and showed the replication moving.
    assert int(page.evaluate("document.body.dataset.refreshes")) > refreshes
    assert seen == sorted(seen), seen
    assert seen[0] == 0.0 and seen[-1] == 100.0
    assert any(0 < p < 100 for p in seen), f"no intermediate progress seen: {seen}"
    assert shot.exists(), "no screenshot mid-replication"
    if target := os.environ.get("DATASYNC_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, target)

    # The injected failure: FAILED, with the reason naming the rewritten file.
    failed_row = page.locator(f'tr[data-placement-id="{failing}"]')
    page.wait_for_selector(
        f'tr[data-placement-id="{failing}"][data-state="FAILED"]', timeout=120_000
    )
    reason = failed_row.locator('[data-role="reason"]').inner_text()
    assert "no good source" in reason and victim in reason, reason
    assert victim in page.locator("#errors").inner_text()
    # One legend entry per link that moved bytes, with a rate.
    page.wait_for_selector('#legend li[data-link="pipeline → s3"]', timeout=30_000)
    # Explain: the panel opens for the failed placement and shows its errors.
    failed_row.click()
    page.wait_for_selector("#explain:not([hidden])", timeout=10_000)
    # The panel opens at once; its body arrives with the explain response.
    page.wait_for_selector('#explain [data-role="summary"]', timeout=10_000)
    panel = page.locator("#explain").inner_text()
    assert f"#{failing}" in panel and "ChecksumMismatch" in panel, panel
    page.screenshot(path=str(tmp / "dashboard-explain.png"), full_page=True)
    assert errors == [], errors
