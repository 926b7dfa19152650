"""The one retry policy for backend calls: jittered exponential backoff.

Invariants:

* Only errors that say so are retried: a ``DatasyncError`` with ``retryable`` true
  (``Throttled``, ``TransientError``). Permanent errors and anything unclassified (a bug)
  propagate on the first attempt, untouched.
* A ``Throttled.retry_after`` from the server is a floor for the next delay.
* Attempts stop at ``max_attempts`` or when the next sleep would pass ``max_elapsed``; the
  last error is then raised with a note saying how long we tried.
* Time is injected (``sleep``, ``clock``, ``random``), so tests never really sleep.

Delays use "full jitter" (uniform in ``[0, min(max_delay, initial * multiplier**n)]``),
which spreads a herd of workers that were throttled at the same moment.
"""

from __future__ import annotations

import functools
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from datasync.errors import DatasyncError, Throttled

__all__ = ["RetryEvent", "RetryPolicy", "Retrying", "is_retryable"]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    max_elapsed: float = 300.0  # seconds, including sleeps
    initial_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_retry_after: float = 300.0  # cap on a server's Retry-After, against absurd values

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_delay < 0 or self.multiplier < 1:
            raise ValueError(f"bad retry policy {self}")


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Passed to hooks (metrics, logs) before each sleep and on giving up."""

    attempt: int  # 1-based attempt that just failed
    error: BaseException
    delay: float  # seconds we are about to sleep (0.0 when giving up)
    elapsed: float  # seconds since the first attempt started


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, DatasyncError) and exc.retryable


class Retrying:
    """Run a callable under ``policy``. Thread-safe: it keeps no per-call state."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        on_retry: Callable[[RetryEvent], None] | None = None,
        on_giveup: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._random = random
        self._on_retry = on_retry
        self._on_giveup = on_giveup

    def delay_for(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        p = self.policy
        ceiling = min(p.max_delay, p.initial_delay * p.multiplier ** (attempt - 1))
        delay = self._random() * ceiling
        if isinstance(error, Throttled) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, p.max_retry_after))
        return delay

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                elapsed = self._clock() - start
                delay = self.delay_for(attempt, exc)
                if attempt >= self.policy.max_attempts or elapsed + delay > self.policy.max_elapsed:
                    if self._on_giveup is not None:
                        self._on_giveup(RetryEvent(attempt, exc, 0.0, elapsed))
                    exc.add_note(f"gave up after {attempt} attempt(s) over {elapsed:.1f}s")
                    raise
                if self._on_retry is not None:
                    self._on_retry(RetryEvent(attempt, exc, delay, elapsed))
                self._sleep(delay)

    def wrap(self, fn: Callable[P, T]) -> Callable[P, T]:
        """``fn`` with this policy applied (for methods called from many places)."""

        @functools.wraps(fn)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return wrapped
