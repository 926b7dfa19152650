"""CPU seconds spent by the processes of one benchmark round (psutil), to show where a
row's time goes: the client's own CPU against the emulator's, on the cores they share.

A round's wall time alone cannot say whether a row is bound by the server (both tools
wait on the same emulator) or by the client (its CPU competes with the emulator's on 2
cores). ``Sample`` deltas over each tool's timed window answer that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

__all__ = ["CpuMeter", "Sample"]


@dataclass(frozen=True)
class Sample:
    """Cumulative CPU seconds (user + system) at one instant."""

    own: float  # this process (datasync's planner and its polling run here)
    workers: float  # live ``multiprocessing`` children (datasync's worker processes)
    waited: float  # children already waited for (a peer tool run with ``subprocess.run``)
    server: float  # the emulator

    def __sub__(self, other: Sample) -> Sample:
        return Sample(
            self.own - other.own,
            self.workers - other.workers,
            self.waited - other.waited,
            self.server - other.server,
        )


class CpuMeter:
    """Samples this process, its worker children and the emulator listening on the port
    named in ``endpoint`` (a child of this process, started by the test fixtures)."""

    def __init__(self, endpoint: str) -> None:
        port = re.search(r"127\.0\.0\.1:(\d+)", endpoint)
        assert port is not None, f"no loopback port in {endpoint!r}"
        self.me = psutil.Process()
        server = next((p for p in self.me.children(recursive=True) if port[1] in p.cmdline()), None)
        assert server is not None, f"no child process serves port {port[1]}"
        self.server: psutil.Process = server

    def sample(self) -> Sample:
        mine = self.me.cpu_times()
        workers = 0.0
        for child in self.me.children(recursive=True):
            try:
                if any("multiprocessing" in arg for arg in child.cmdline()):
                    times = child.cpu_times()
                    workers += times.user + times.system
            except psutil.NoSuchProcess:  # exited between the listing and the read
                continue
        served = self.server.cpu_times()
        return Sample(
            mine.user + mine.system,
            workers,
            mine.children_user + mine.children_system,
            served.user + served.system,
        )
