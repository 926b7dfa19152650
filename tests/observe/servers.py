"""Real processes for the observability tests: ``datasync`` daemons and CLI commands on
free loopback ports, in a home of their own, and small sample trees.

Plain helpers (no fixtures), shared by ``tests/observe``, ``tests/integration`` and
``tests/e2e``. Every process started here is stopped by the same test, by its id.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

EXE = str(Path(sys.executable).with_name("datasync"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def datasync_env(home: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DATASYNC_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["DATASYNC_HOME"] = str(home)
    if database_url:
        env["DATASYNC_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def write_config(home: Path, sites: dict[str, str | dict[str, Any]]) -> None:
    """``datasync.toml`` with ``[sites.NAME]`` tables (a URL, or a table's fields)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, site in sites.items():
        fields = {"url": site} if isinstance(site, str) else site
        lines.append(f"[sites.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in fields.items()]
        lines.append("")
    (home / "datasync.toml").write_text("\n".join(lines), encoding="utf-8")


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def make_files(root: Path, count: int, low: int, high: int, seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"cam{i % 4}/{i:06d}.jpg": rng.randbytes(rng.randint(low, high)) for i in range(count)}
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


def run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [EXE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return done


def run_json(env: dict[str, str], *args: str, timeout: float = 300) -> Any:
    done = run(env, *args, "--json", timeout=timeout)
    assert done.returncode == 0, (args, done.stdout, done.stderr[-3000:])
    return json.loads(done.stdout)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return int(self.proc.returncode)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def start(
    env: dict[str, str],
    log: Path,
    *args: str,
    port: int | None = None,
    ready: str | None = "/api/v1/health",
    timeout: float = 120,
) -> Daemon:
    """Start ``datasync ARGS`` (with ``--port`` when ``port``) and wait until ``ready``
    answers 200 on it."""
    argv = [EXE, *args] + (["--port", str(port)] if port is not None else [])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log)
    if ready is None or port is None:
        return daemon
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"datasync {args[0]} exited: {daemon.tail()}")
        try:
            if httpx.get(daemon.url + ready, timeout=5).status_code == 200:
                return daemon
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"datasync {args[0]} did not answer: {daemon.tail()}")
        time.sleep(0.2)
