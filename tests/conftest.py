"""Root test configuration.

Fixture modules live in ``tests/fixtures/`` (one per area) and are loaded here, so
each area owns its own file. Under ``CI=true`` a skipped test is reported as a failure:
a missing emulator or database must never pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from pluggy import Result

pytest_plugins = [
    "tests.fixtures.databases",
    "tests.fixtures.emulators",
    "tests.fixtures.slurm",
    "tests.fixtures.transfer",
]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# No per-example time limit: tests check behaviour, not speed, and a busy 2-core box
# makes hypothesis's 200 ms default deadline fail at random.
settings.register_profile("datasync", deadline=None)
settings.load_profile("datasync")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (skips are failures in CI): {report.longrepr}"


@pytest.fixture(autouse=True)
def _fresh_logging() -> Generator[None, None, None]:
    """Each test starts with the logging a new ``datasync`` process has.

    In-process CLI runs (``CliRunner``) skip ``main()``, and a daemon command run that
    way leaves the root logger at INFO with its stderr handler: the next test's command
    would then log events into the stderr it asserts on. Processes never share that."""
    from datasync.observe.logs import reset_logging

    yield
    reset_logging()
