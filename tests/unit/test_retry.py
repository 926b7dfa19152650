"""The one retry policy (``datasync.backends.retry``), with injected time: no real sleeps."""

from __future__ import annotations

import pytest

from datasync.backends.retry import RetryEvent, Retrying, RetryPolicy, is_retryable
from datasync.errors import (
    NoSpace,
    NotFound,
    PermissionDenied,
    SourceChanged,
    Throttled,
    TransientError,
)


class FakeClock:
    """``sleep`` advances ``now``; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class Flaky:
    """Raises the given errors in turn, then returns ``result``."""

    def __init__(self, *errors: Exception, result: str = "done") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def retrying(clock: FakeClock, policy: RetryPolicy | None = None, **kw: object) -> Retrying:
    return Retrying(policy, sleep=clock.sleep, clock=clock.clock, **kw)  # type: ignore[arg-type]


def test_success_needs_no_sleep() -> None:
    clock = FakeClock()
    assert retrying(clock).call(lambda: 42) == 42
    assert clock.sleeps == []


def test_retryable_errors_are_retried_until_success() -> None:
    """Invariant 7: errors classified retryable are retried with backoff."""
    clock = FakeClock()
    fn = Flaky(TransientError("reset"), Throttled("slow"), TransientError("timeout"))
    assert retrying(clock, random=lambda: 1.0).call(fn) == "done"
    assert fn.calls == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]  # exponential, full jitter at its ceiling


@pytest.mark.parametrize(
    "error",
    [
        NotFound("gone"),
        PermissionDenied("no"),
        NoSpace("full"),
        SourceChanged("moved"),
        ValueError("a bug"),
    ],
)
def test_permanent_and_unclassified_errors_are_not_retried(error: Exception) -> None:
    """Invariant 7: permanent (and unclassified) errors fail on the first attempt."""
    clock = FakeClock()
    fn = Flaky(error)
    with pytest.raises(type(error)) as caught:
        retrying(clock).call(fn)
    assert caught.value is error
    assert fn.calls == 1
    assert clock.sleeps == []
    assert not getattr(caught.value, "__notes__", None)


def test_is_retryable_follows_the_error_tree() -> None:
    """Invariant 7: retryability is the error class's own classification."""
    assert is_retryable(Throttled("x")) and is_retryable(TransientError("x"))
    assert not is_retryable(NotFound("x")) and not is_retryable(OSError("x"))


def test_jitter_spreads_delays_below_the_ceiling() -> None:
    clock = FakeClock()
    draws = iter([0.5, 0.25, 0.0])
    fn = Flaky(TransientError("a"), TransientError("b"), TransientError("c"))
    retrying(clock, random=lambda: next(draws)).call(fn)
    assert clock.sleeps == [0.05, 0.05, 0.0]


def test_delay_is_capped_by_max_delay() -> None:
    r = Retrying(RetryPolicy(initial_delay=1.0, max_delay=5.0), random=lambda: 1.0)
    assert [r.delay_for(n, TransientError("x")) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_retry_after_is_a_floor_and_capped() -> None:
    """Invariant 7: a throttled answer's Retry-After paces the next attempt."""
    r = Retrying(RetryPolicy(max_retry_after=60.0), random=lambda: 0.0)
    assert r.delay_for(1, Throttled("x", retry_after=3.0)) == 3.0
    assert r.delay_for(1, Throttled("x")) == 0.0
    assert r.delay_for(1, Throttled("x", retry_after=86400)) == 60.0
    r2 = Retrying(RetryPolicy(initial_delay=10.0), random=lambda: 1.0)
    assert r2.delay_for(1, Throttled("x", retry_after=3.0)) == 10.0


def test_gives_up_after_max_attempts_with_a_note() -> None:
    """Invariant 7: retries are bounded, and the final error says how long we tried."""
    clock = FakeClock()
    errors = [TransientError(f"t{i}") for i in range(10)]
    fn = Flaky(*errors)
    with pytest.raises(TransientError) as caught:
        retrying(clock, RetryPolicy(max_attempts=3), random=lambda: 1.0).call(fn)
    assert caught.value is errors[2]
    assert fn.calls == 3
    assert len(clock.sleeps) == 2
    assert caught.value.__notes__ == ["gave up after 3 attempt(s) over 0.3s"]


def test_gives_up_when_the_next_sleep_passes_max_elapsed() -> None:
    """Invariant 7: retries are bounded in time as well as in attempts."""
    clock = FakeClock()
    fn = Flaky(*[Throttled("slow", retry_after=40.0) for _ in range(10)])
    with pytest.raises(Throttled):
        retrying(clock, RetryPolicy(max_elapsed=100.0)).call(fn)
    assert clock.sleeps == [40.0, 40.0]  # a third 40 s sleep would end past 100 s
    assert fn.calls == 3


def test_hooks_see_each_retry_and_the_give_up() -> None:
    clock = FakeClock()
    retries: list[RetryEvent] = []
    giveups: list[RetryEvent] = []
    fn = Flaky(TransientError("a"), TransientError("b"), TransientError("c"))
    with pytest.raises(TransientError):
        Retrying(
            RetryPolicy(max_attempts=3),
            sleep=clock.sleep,
            clock=clock.clock,
            random=lambda: 1.0,
            on_retry=retries.append,
            on_giveup=giveups.append,
        ).call(fn)
    assert [(e.attempt, e.delay, str(e.error)) for e in retries] == [(1, 0.1, "a"), (2, 0.2, "b")]
    assert retries[1].elapsed == pytest.approx(0.1)
    assert [(e.attempt, e.delay, str(e.error)) for e in giveups] == [(3, 0.0, "c")]


def test_wrap_keeps_name_and_arguments() -> None:
    clock = FakeClock()
    calls: list[tuple[int, str]] = []

    def fetch(a: int, *, b: str) -> str:
        """Docstring kept."""
        calls.append((a, b))
        if len(calls) < 2:
            raise TransientError("once")
        return f"{a}{b}"

    wrapped = retrying(clock).wrap(fetch)
    assert wrapped(1, b="x") == "1x"
    assert calls == [(1, "x"), (1, "x")]
    assert wrapped.__name__ == "fetch" and wrapped.__doc__ == "Docstring kept."


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)
