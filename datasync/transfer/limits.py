"""Per-site and per-link limits that hold across every worker process on a host.

Three mechanisms, all kept in files under ``$DATASYNC_HOME/locks`` so that independent
processes (``datasync worker --processes N``, several ``datasync up``) share them:

* **Concurrency**: a site (or link ``src->dst``) with limit N has N slot files. Holding a
  slot is holding an exclusive ``flock`` on one of them. The kernel drops a dead process's
  locks, so a SIGKILLed worker never leaks a slot. ``flock`` locks belong to the open file
  description, so two threads of one process also exclude each other.
* **Throttling (AIMD)**: the usable concurrency of a site is ``min(configured, current)``;
  a ``Throttled`` error halves ``current`` (at most once per ``decrease_window`` seconds, so a
  burst of 503s counts once) and blocks new operations until ``retry_after`` has passed.
  Every ``current`` successes add one back (additive probe up), as TCP and AzCopy's pacer do.
* **Bandwidth**: a token bucket per site and per link with rate ``bandwidth_mbps`` and one
  second of burst. A caller takes its bytes immediately, going into debt, and sleeps the debt
  off outside the lock: one lock round-trip per chunk, fair between processes.

The shared state of a site/link is a fixed-size record read and written with
``pread``/``pwrite`` under ``flock`` on its state file. Times are ``time.monotonic()``,
which on Linux is one clock for all processes. ``clock`` and ``sleep`` are injectable so the
policy is tested without real sleeps.

Slots are taken in one global order (sorted names, links last), so two operations that
need overlapping slots cannot deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from datasync.config import SiteConfig

__all__ = ["LimitSpec", "Limits", "SlotLane", "limits_from_settings"]

# limit(current concurrency), successes, backoff_until, last_decrease, tokens, last_refill
_STATE = struct.Struct("<dddddd")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Configured ceiling of one site or link. ``None`` means unlimited."""

    concurrency: int | None = None
    bandwidth_mbps: float | None = None

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8


@dataclass
class _State:
    limit: float
    successes: float
    backoff_until: float
    last_decrease: float
    tokens: float
    last_refill: float


class _Shared:
    """One site's or link's shared record: a state file plus an in-process lock."""

    def __init__(self, path: Path, spec: LimitSpec, clock: Callable[[], float]) -> None:
        self.path = path
        self.spec = spec
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    @contextlib.contextmanager
    def locked(self) -> Iterator[_State]:
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _STATE.size, 0)
                ceiling = float(self.spec.concurrency or 0)
                if len(raw) == _STATE.size:
                    st = _State(*_STATE.unpack(raw))
                else:
                    rate = self.spec.bytes_per_second or 0.0
                    st = _State(ceiling, 0.0, 0.0, -1e18, rate, self._clock())
                if ceiling:
                    st.limit = min(max(st.limit, 1.0), ceiling)
                yield st
                os.pwrite(fd, _STATE.pack(*vars(st).values()), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def at_ceiling(self) -> bool:
        """Is the usable concurrency at the configured ceiling? Read without the lock: it
        is called after every successful backend call, and a stale answer only delays or
        skips one additive step (the locked path decides)."""
        with self._lock:
            raw = os.pread(self._open(), _STATE.size, 0)
        if len(raw) != _STATE.size:
            return False
        limit: float = _STATE.unpack(raw)[0]
        return limit >= (self.spec.concurrency or 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Limits:
    """Host-wide limits for a set of sites and links. One instance per process is enough;
    several instances (or processes) pointing at the same ``lock_dir`` share the limits."""

    def __init__(
        self,
        lock_dir: Path,
        sites: Mapping[str, LimitSpec],
        links: Mapping[tuple[str, str], LimitSpec] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.005,
        decrease_window: float = 1.0,
        default_retry_after: float = 1.0,
    ) -> None:
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._sites = dict(sites)
        self._links = dict(links or {})
        self._clock = clock
        self._sleep = sleep
        self._poll = poll_interval
        self._window = decrease_window
        self._default_retry_after = default_retry_after
        self._shared: dict[str, _Shared] = {}
        self._guard = threading.Lock()

    # -- naming ---------------------------------------------------------------------------

    @staticmethod
    def _name(site: str) -> str:
        return "site-" + _SAFE.sub("_", site)

    @staticmethod
    def _link_name(src: str, dst: str) -> str:
        return "link-" + _SAFE.sub("_", src) + "--" + _SAFE.sub("_", dst)

    def _spec(self, name: str, key: str | tuple[str, str]) -> LimitSpec:
        if isinstance(key, tuple):
            return self._links.get(key, LimitSpec())
        return self._sites.get(key, LimitSpec())

    def _get(self, name: str, key: str | tuple[str, str]) -> _Shared:
        with self._guard:
            sh = self._shared.get(name)
            if sh is None:
                sh = _Shared(self.lock_dir / f"{name}.state", self._spec(name, key), self._clock)
                self._shared[name] = sh
            return sh

    def _targets(self, src: str | None, dst: str) -> list[tuple[str, str | tuple[str, str]]]:
        sites = sorted({dst} | ({src} if src else set()))
        out: list[tuple[str, str | tuple[str, str]]] = [(self._name(s), s) for s in sites]
        if src and src != dst:
            out.append((self._link_name(src, dst), (src, dst)))
        return out

    # -- concurrency ------------------------------------------------------------------------

    def current_limit(self, site: str) -> float:
        """The site's usable concurrency now (after throttling), 0 when unlimited."""
        with self._get(self._name(site), site).locked() as st:
            return st.limit

    def throttled_at(self, site: str) -> float | None:
        """When the site's concurrency was last halved (``clock`` time), None if never."""
        with self._get(self._name(site), site).locked() as st:
            return None if st.last_decrease < -1e17 else st.last_decrease

    def _try_slot(self, sh: _Shared) -> int | None:
        """Take a free slot file of ``sh`` or return None; also honours throttle backoff."""
        with sh.locked() as st:
            if self._clock() < st.backoff_until:
                return None
            limit = int(st.limit) if sh.spec.concurrency else 0
        if not limit:
            return -1  # unlimited: nothing to hold
        for i in range(limit):
            fd = os.open(sh.path.with_suffix(f".slot{i}"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    def _acquire(self, dst: str, src: str | None) -> list[int]:
        """Take one slot at ``dst``, ``src`` and their link, in the global order."""
        held: list[int] = []
        try:
            for name, key in self._targets(src, dst):
                sh = self._get(name, key)
                while (fd := self._try_slot(sh)) is None:
                    self._sleep(self._poll)
                if fd >= 0:
                    held.append(fd)
        except BaseException:
            self._release(held)
            raise
        return held

    @staticmethod
    def _release(held: list[int]) -> None:
        for fd in reversed(held):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        held.clear()

    @contextlib.contextmanager
    def slot(self, dst: str, src: str | None = None) -> Iterator[None]:
        """Hold one concurrency slot at ``dst``, at ``src`` and on the link ``src->dst``."""
        held = self._acquire(dst, src)
        try:
            yield
        finally:
            self._release(held)

    def lane(self, *, max_hold: float = 1.0, flush_bytes: int = 1 << 20) -> SlotLane:
        """A holder that keeps one set of slots across many small operations (``SlotLane``)."""
        return SlotLane(self, max_hold=max_hold, flush_bytes=flush_bytes)

    # -- throttling --------------------------------------------------------------------------

    def on_throttled(self, site: str, retry_after: float | None = None) -> None:
        """Multiplicative decrease: halve the site's concurrency and pause it."""
        sh = self._get(self._name(site), site)
        now = self._clock()
        with sh.locked() as st:
            pause = retry_after if retry_after is not None else self._default_retry_after
            st.backoff_until = max(st.backoff_until, now + pause)
            if now - st.last_decrease >= self._window:
                if sh.spec.concurrency:
                    st.limit = max(1.0, float(int(st.limit) // 2) or 1.0)
                st.last_decrease = now
                st.successes = 0.0

    def on_success(self, site: str) -> None:
        """Additive increase: one more slot after ``limit`` successes in a row."""
        sh = self._get(self._name(site), site)
        if not sh.spec.concurrency or sh.at_ceiling():
            return
        with sh.locked() as st:
            if st.limit >= sh.spec.concurrency:
                return
            st.successes += 1
            if st.successes >= st.limit:
                st.limit = min(float(sh.spec.concurrency), st.limit + 1)
                st.successes = 0.0

    # -- bandwidth ---------------------------------------------------------------------------

    def take_bandwidth(self, nbytes: int, dst: str, src: str | None = None) -> float:
        """Account ``nbytes`` against every bucket on the path; sleep off any debt.

        Returns the seconds slept (for metrics and tests)."""
        wait = 0.0
        if nbytes <= 0:
            return wait
        for name, key in self._targets(src, dst):
            sh = self._get(name, key)
            rate = sh.spec.bytes_per_second
            if not rate:
                continue
            with sh.locked() as st:
                now = self._clock()
                st.tokens = min(rate, st.tokens + (now - st.last_refill) * rate)
                st.last_refill = now
                st.tokens -= nbytes
                if st.tokens < 0:
                    wait = max(wait, -st.tokens / rate)
        if wait > 0:
            self._sleep(wait)
        return wait

    def close(self) -> None:
        with self._guard:
            for sh in self._shared.values():
                sh.close()
            self._shared.clear()


class SlotLane:
    """One stream of small operations that holds ONE set of slots across many of them.

    A batch of small blobs is copied by a few lanes; each lane takes its slots (``dst``,
    ``src``, link) once instead of once per blob, which is what costs at 64 KiB per blob
    (three ``flock`` round trips on shared files). The limits still hold: a lane is one
    stream, so it counts once against each concurrency limit, like one ``slot()``.

    * ``hold(dst, src)`` makes sure this lane holds the slots of that pair. Another pair
      releases the current set first: a lane never holds two sets, so the global order of
      ``Limits.slot`` (no deadlock) is kept.
    * The set is released and taken again after ``max_hold`` seconds, so a throttle's
      ``retry_after`` and a halved limit reach a long-lived lane within that time.
    * ``charge(n)`` adds bytes to the lane's bandwidth account; it is taken from the
      buckets every ``flush_bytes`` (and on release), one lock round trip per MiB instead
      of one per blob. The bucket may run ``flush_bytes`` ahead per lane, within its burst.
    * ``release()`` (also on leaving a ``with`` block) settles bandwidth and frees slots.
    """

    def __init__(self, limits: Limits, *, max_hold: float, flush_bytes: int) -> None:
        self._limits = limits
        self._max_hold = max_hold
        self._flush_bytes = flush_bytes
        self._pair: tuple[str, str | None] | None = None
        self._held: list[int] = []
        self._since = 0.0
        self._pending = 0

    @property
    def holding(self) -> tuple[str, str | None] | None:
        """The ``(dst, src)`` whose slots this lane holds now, None when it holds none."""
        return self._pair

    def hold(self, dst: str, src: str | None = None) -> None:
        pair = (dst, src)
        now = self._limits._clock()
        if self._pair == pair and now - self._since < self._max_hold:
            return
        self.release()
        self._held = self._limits._acquire(dst, src)
        self._pair = pair
        self._since = self._limits._clock()

    def charge(self, nbytes: int) -> None:
        """Account ``nbytes`` moved on the held pair (sleeping off debt at each flush)."""
        if self._pair is None:
            raise RuntimeError("charge() outside hold(): no pair to account the bytes to")
        self._pending += nbytes
        if self._pending >= self._flush_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pair is not None and self._pending:
            dst, src = self._pair
            nbytes, self._pending = self._pending, 0  # a failed sleep must not charge twice
            self._limits.take_bandwidth(nbytes, dst, src=src)

    def release(self) -> None:
        try:
            self._flush()
        finally:
            self._limits._release(self._held)
            self._pair = None

    def __enter__(self) -> SlotLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def limits_from_settings(home: Path, sites: Mapping[str, SiteConfig]) -> Limits:
    """Limits for the configured sites and links (``[sites.SRC.links.DST]``), sharing
    ``home/locks`` with every process on the host."""
    specs = {
        name: LimitSpec(concurrency=s.concurrency, bandwidth_mbps=s.bandwidth_mbps)
        for name, s in sites.items()
    }
    links = {
        (src, dst): LimitSpec(concurrency=link.concurrency, bandwidth_mbps=link.bandwidth_mbps)
        for src, s in sites.items()
        for dst, link in s.links.items()
    }
    return Limits(Path(home) / "locks", specs, links)
