"""The one retry policy of datasync, built on tenacity (PLAN.md decision 6).

It is used in exactly two scopes:

* **every backend call**, through ``datasync.backends.retrying.RetryingBackend``
  (``RetryPolicy.run``/``call``: attempts within one task, sleeping between them);
* **the task queue**, between attempts of a task (``task_delay``/``task_budget``: the
  same formula with its own, longer backoff; the queue sleeps by ``not_before``).

Invariants:

* Classification is ``DatasyncError.retryable`` and nothing else: permanent errors and
  anything unclassified (a bug) leave on the first attempt, untouched.
* Each retryable class has a budget (``Budget``: attempts, and seconds since the first
  attempt, sleeps included); the first entry of ``budgets`` the error is an instance of
  applies, else ``other_retryable``. An exhausted budget re-raises the last error with a
  note saying what was tried. A class whose call budget is one attempt leaves a call
  untouched, as a permanent error does.
* The task scope may give a class its own attempts (``task_budgets``). ``NoSpace`` is
  the case: never retried within a call (a full disk does not empty in milliseconds),
  but between a task's attempts with the long ``space_backoff``, up to its budget, so a
  briefly full site recovers without anyone running ``replicate`` again.
* Delays are full-jitter exponential, ``uniform(0, min(cap, initial * multiplier**(n-1)))``
  after failed attempt ``n``, which spreads a herd of workers throttled at the same
  moment (``Backoff.floor`` keeps a fraction of that ceiling as a minimum, for long
  pauses); a server's ``Throttled.retry_after`` is a floor (capped by
  ``max_retry_after``, against absurd values).
* ``sleep``, ``clock`` and ``random`` are injected, so tests never sleep.
"""

from __future__ import annotations

import functools
import math
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import tenacity

from datasync.errors import DatasyncError, NoSpace, Throttled, TransientError

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_TASK_BUDGETS",
    "Backoff",
    "Budget",
    "RetryEvent",
    "RetryPolicy",
    "is_retryable",
]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Budget:
    """How far one class of error may be retried."""

    attempts: int  # attempts in all, the first included
    max_elapsed: float = math.inf  # seconds since the first attempt began, sleeps included

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_elapsed < 0:
            raise ValueError(f"bad retry budget {self}")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential delays: ``uniform(0, min(cap, initial * multiplier**(n-1)))``;
    with ``floor`` f, ``uniform(f, 1)`` times that ceiling."""

    initial: float
    cap: float
    multiplier: float = 2.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < 0 or self.multiplier < 1 or not 0 <= self.floor <= 1:
            raise ValueError(f"bad backoff {self}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        if exponent > 1000:  # beyond any cap; avoids float overflow
            return self.cap
        return min(self.cap, self.initial * self.multiplier**exponent)


DEFAULT_BUDGETS: tuple[tuple[type[BaseException], Budget], ...] = (
    (Throttled, Budget(8, 300.0)),
    (TransientError, Budget(4, 120.0)),
    (NoSpace, Budget(1)),  # within a call: space does not come back in milliseconds
)
# The task scope's own attempts for a class (the task's ``max_attempts`` caps them too).
DEFAULT_TASK_BUDGETS: tuple[tuple[type[BaseException], Budget], ...] = ((NoSpace, Budget(8)),)
_NO_RETRY = Budget(1)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """What a hook hears before each sleep: nothing about the site or the call."""

    attempt: int  # 1-based attempt that just failed
    error: BaseException
    delay: float  # seconds about to be slept
    elapsed: float  # seconds since the first attempt began


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, DatasyncError) and exc.retryable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Budgets, delays and time. Immutable and thread-safe; one per process is enough."""

    budgets: tuple[tuple[type[BaseException], Budget], ...] = DEFAULT_BUDGETS
    other_retryable: Budget = Budget(4, 120.0)  # retryable errors no budget names
    call_backoff: Backoff = Backoff(0.1, 30.0)
    task_backoff: Backoff = Backoff(2.0, 300.0)
    task_budgets: tuple[tuple[type[BaseException], Budget], ...] = DEFAULT_TASK_BUDGETS
    # Between attempts of a task that found its destination full: 18 to 35 minutes over
    # 8 attempts, then the task fails with the NoSpace error.
    space_backoff: Backoff = Backoff(30.0, 600.0, floor=0.5)
    max_retry_after: float = 300.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    random: Callable[[], float] = field(default=_random.random, compare=False)

    # -- classification and delays (both scopes) ---------------------------------------------

    def budget(self, exc: BaseException) -> Budget:
        """The budget of ``exc``'s class; one attempt for anything not retryable."""
        if not is_retryable(exc):
            return _NO_RETRY
        for kind, budget in self.budgets:
            if isinstance(exc, kind):
                return budget
        return self.other_retryable

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed call attempt ``attempt`` (1-based)."""
        return self._delay(self.call_backoff, attempt, exc)

    def task_delay(self, attempts: int, exc: BaseException) -> float:
        """Seconds a task waits (``not_before``) after its ``attempts``-th failed attempt."""
        backoff = self.space_backoff if isinstance(exc, NoSpace) else self.task_backoff
        return self._delay(backoff, attempts, exc)

    def task_budget(self, exc: BaseException) -> int:
        """How many attempts a task failing with ``exc`` gets in all (1: fail it now)."""
        if is_retryable(exc):
            for kind, budget in self.task_budgets:
                if isinstance(exc, kind):
                    return budget.attempts
        return self.budget(exc).attempts

    def task_retry_delay(
        self, attempts: int, max_attempts: int, exc: BaseException
    ) -> float | None:
        """The task queue's question: seconds before the next attempt of a task that failed
        its ``attempts``-th attempt with ``exc``, or None when it must fail now (permanent,
        or its class's budget or the task's own ``max_attempts`` is spent)."""
        if attempts >= min(max_attempts, self.task_budget(exc)):
            return None
        return self.task_delay(attempts, exc)

    def _delay(self, backoff: Backoff, attempt: int, exc: BaseException) -> float:
        share = backoff.floor + (1.0 - backoff.floor) * self.random()
        delay = share * backoff.ceiling(attempt)
        if isinstance(exc, Throttled) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.max_retry_after))
        return delay

    # -- the call scope -----------------------------------------------------------------------

    def run(
        self, fn: Callable[[], T], *, on_retry: Callable[[RetryEvent], None] | None = None
    ) -> T:
        """``fn()`` under this policy; ``on_retry`` hears every retry before its sleep."""
        start = self.clock()
        # The first attempt runs outside tenacity: most calls succeed, and this path is hot
        # (every ranged read of every worker thread).
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc) or self.budget(exc).attempts <= 1:
                raise
            first: list[BaseException] = [exc]

        def attempt() -> T:
            if first:
                raise first.pop()  # replays the first failure as tenacity's attempt 1
            return fn()

        delays: dict[int, float] = {}

        def failure(state: tenacity.RetryCallState) -> BaseException:
            assert state.outcome is not None
            exc = state.outcome.exception()
            assert exc is not None
            return exc

        def next_delay(state: tenacity.RetryCallState) -> float:
            # tenacity asks ``wait`` and ``stop`` in an order that changed between releases;
            # both see the same draw.
            n = state.attempt_number
            if n not in delays:
                delays[n] = self.delay(n, failure(state))
            return delays[n]

        def stop(state: tenacity.RetryCallState) -> bool:
            budget = self.budget(failure(state))
            elapsed = self.clock() - start
            return (
                state.attempt_number >= budget.attempts
                or elapsed + next_delay(state) > budget.max_elapsed
            )

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None:
                event = RetryEvent(
                    state.attempt_number, failure(state), next_delay(state), self.clock() - start
                )
                on_retry(event)

        def give_up(state: tenacity.RetryCallState) -> T:
            exc = failure(state)
            budget = self.budget(exc)
            exc.add_note(
                f"gave up after {state.attempt_number} attempt(s) over "
                f"{self.clock() - start:.1f}s ({type(exc).__name__} budget: "
                f"{budget.attempts} attempts, {budget.max_elapsed:g}s)"
            )
            raise exc

        retrying = tenacity.Retrying(
            sleep=self.sleep,
            retry=tenacity.retry_if_exception(is_retryable),
            wait=next_delay,
            stop=stop,
            before_sleep=before_sleep,
            retry_error_callback=give_up,
            reraise=True,
        )
        return retrying(attempt)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` under this policy."""
        return self.run(functools.partial(fn, *args, **kwargs))

    def wrap(self, fn: Callable[P, T]) -> Callable[P, T]:
        """``fn`` with this policy applied (for functions called from many places)."""

        @functools.wraps(fn)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return wrapped
