"""deploy/systemd: the units load cleanly and are hardened.

``systemd-analyze verify`` loads each unit offline (syntax, known directives, executable
ExecStart; the unit's /opt/datasync path is swapped for this venv's ``datasync``), and
``systemd-analyze security --offline=true`` scores its sandboxing. The units are not
started: these machines run no systemd as PID 1 (a container), so nothing can start a
service; starting them needs a systemd host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
DATASYNC = str(Path(sys.executable).parent / "datasync")
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "User": "datasync",
    "CapabilityBoundingSet": "",
}


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed: run `make system-deps`")
    return tool


def _installed(unit: Path, folder: Path) -> Path:
    target = folder / unit.name
    target.write_text(unit.read_text().replace("/opt/datasync/bin/datasync", DATASYNC))
    return target


def _settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        match = re.match(r"^(\w+)=(.*)$", line)
        if match:
            out.setdefault(match.group(1), []).append(match.group(2))
    return out


def test_server_and_worker_units_exist() -> None:
    assert [u.name for u in SERVICES] == ["datasync-server.service", "datasync-worker.service"]
    assert "datasync up" in UNITS.joinpath("datasync-server.service").read_text()
    assert "datasync worker" in UNITS.joinpath("datasync-worker.service").read_text()


@pytest.mark.parametrize("unit", SERVICES, ids=[u.name for u in SERVICES])
def test_unit_verifies_and_is_hardened(unit: Path, tmp_path: Path) -> None:
    tool = _analyze()
    installed = _installed(unit, tmp_path)
    verify = subprocess.run([tool, "verify", str(installed)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    settings = _settings(unit)
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], key
    security = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(installed)],
        capture_output=True, text=True,
    )  # fmt: skip
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    # 0 is fully sandboxed, 10 is none at all; systemd calls up to 1.9 "OK".
    assert float(score.group(1)) <= 1.9, security.stdout


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive and a missing binary are errors."""
    tool = _analyze()
    unit = _installed(SERVICES[0], tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert "Unknown key 'NoNewPrivilege'" in verify.stderr  # our check: stderr must be empty
    unit.write_text(SERVICES[0].read_text())  # /opt/datasync/bin/datasync is not here
    verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode != 0 and "/opt/datasync/bin/datasync" in verify.stderr
