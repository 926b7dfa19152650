"""Alert rules and the Grafana dashboard against the metrics datasync really exposes.

``promtool`` (Debian ``prometheus``) checks the rules and runs their unit tests
(``deploy/prometheus/alerts.test.yml``: each alert fires on a made-up history and stays
silent on a healthy one) and checks the example configuration. Every ``datasync_*`` name
that a rule or a dashboard panel queries must be one the registry declares: a renamed
metric breaks this test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from datasync.observe.metrics import metric_names

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "datasync.json"
_NAME = re.compile(r"\bdatasync_[a-z0-9_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed: make system-deps (Debian package prometheus)")
    return found


def _promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=RULES, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_are_valid_and_their_unit_tests_pass(promtool: str) -> None:
    assert "7 rules found" in _promtool(promtool, "check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "alerts.test.yml")
    _promtool(promtool, "check", "config", "prometheus.example.yml")


def test_the_rule_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """The same unit tests against rules with one threshold changed must fail."""
    rules = (RULES / "alerts.yml").read_text().replace("> 900", "> 90000")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(RULES / "alerts.test.yml", tmp_path / "alerts.test.yml")
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "DatasyncQueueStuck" in done.stdout + done.stderr


def _queried(text: str) -> set[str]:
    return set(_NAME.findall(text))


def test_every_metric_in_rules_and_dashboard_exists() -> None:
    known = metric_names()
    lines = (RULES / "alerts.yml").read_text().splitlines()
    rules = _queried("\n".join(line for line in lines if not line.lstrip().startswith("#")))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    panels = set().union(*(_queried(e) for e in exprs))
    assert rules and panels
    assert rules - known == set()
    assert panels - known == set()
    # And the check itself sees a name that does not exist.
    assert _queried("rate(datasync_bytes_total[5m])") - known == {"datasync_bytes_total"}


def test_the_dashboard_covers_what_the_issue_asks() -> None:
    exprs = " ".join(
        t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])
    )
    for name in (
        "datasync_transfer_bytes_total",  # throughput per link
        "datasync_queue_tasks",  # queue depth
        "datasync_placements",  # placements
        "datasync_placement_deadline_slack_seconds",  # deadlines
        "datasync_task_retries_total",  # errors
        "datasync_site_used_bytes",  # site usage
    ):
        assert name in exprs, name
