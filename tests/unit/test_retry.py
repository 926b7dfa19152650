"""The one retry policy (``datasync.retry``) and ``RetryingBackend``, with injected time:
no test sleeps. Also pins that every SDK's own retries stay off (decision 6)."""

from __future__ import annotations

import ast
import inspect
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import datasync.backends.gcs
from datasync.backends.base import (
    SupportsGroupCommit,
    SupportsLink,
    SupportsLocalTree,
    SupportsReadInto,
    SupportsRename,
)
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.backends.retrying import RetryingBackend
from datasync.errors import (
    ChecksumMismatch,
    Conflict,
    NoSpace,
    NotFound,
    PermissionDenied,
    SourceChanged,
    Throttled,
    TransientError,
)
from datasync.retry import Backoff, Budget, RetryEvent, RetryPolicy, is_retryable


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


def policy(clock: FakeClock, *, random: float = 1.0, **kw: Any) -> RetryPolicy:
    return RetryPolicy(sleep=clock.sleep, clock=clock.clock, random=lambda: random, **kw)


def test_success_needs_no_sleep() -> None:
    clock = FakeClock()
    assert policy(clock).run(lambda: 42) == 42
    assert clock.sleeps == []


def test_retryable_errors_are_retried_until_success() -> None:
    """Invariant 7: errors classified retryable are retried with backoff."""
    clock = FakeClock()
    fn = Flaky(TransientError("a"), Throttled("b"), TransientError("c"))
    assert policy(clock).run(fn) == "done"
    assert fn.calls == 4
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4])


@pytest.mark.parametrize(
    "error",
    [
        NotFound("x"),
        PermissionDenied("x"),
        NoSpace("x"),
        SourceChanged("x"),
        Conflict("x"),
        ChecksumMismatch("x"),
        KeyError("a bug"),
    ],
)
def test_permanent_and_unclassified_errors_are_not_retried(error: Exception) -> None:
    clock = FakeClock()
    fn = Flaky(error)
    with pytest.raises(type(error)) as caught:
        policy(clock).run(fn)
    assert caught.value is error
    assert fn.calls == 1 and clock.sleeps == []
    assert not getattr(caught.value, "__notes__", None)


def test_is_retryable_follows_the_error_tree() -> None:
    assert is_retryable(Throttled("x")) and is_retryable(TransientError("x"))
    assert not is_retryable(NotFound("x")) and not is_retryable(Conflict("x"))
    assert not is_retryable(OSError("x"))


def test_jitter_spreads_delays_below_the_ceiling() -> None:
    draws = iter([0.0, 0.5, 1.0])
    p = RetryPolicy(call_backoff=Backoff(1.0, 30.0), random=lambda: next(draws))
    assert [p.delay(3, TransientError("x")) for _ in range(3)] == [0.0, 2.0, 4.0]


def test_delay_is_capped() -> None:
    p = RetryPolicy(call_backoff=Backoff(1.0, 5.0), random=lambda: 1.0)
    assert p.delay(10, TransientError("x")) == 5.0
    assert p.delay(10_000, TransientError("x")) == 5.0  # no float overflow


def test_retry_after_is_a_floor_and_capped() -> None:
    p = RetryPolicy(max_retry_after=60.0, random=lambda: 0.0)
    assert p.delay(1, Throttled("x", retry_after=7.0)) == 7.0
    assert p.delay(1, Throttled("x", retry_after=1e9)) == 60.0
    assert p.delay(1, TransientError("x")) == 0.0
    late = RetryPolicy(call_backoff=Backoff(10.0, 30.0), random=lambda: 1.0)
    assert late.delay(1, Throttled("x", retry_after=2.0)) == 10.0  # the floor, not a ceiling


@pytest.mark.parametrize(("error", "attempts"), [(Throttled, 8), (TransientError, 4)])
def test_each_class_has_its_budget_and_giving_up_says_so(
    error: type[Exception], attempts: int
) -> None:
    clock = FakeClock()
    fn = Flaky(*[error("again") for _ in range(20)])
    with pytest.raises(error) as caught:
        policy(clock, random=0.0).run(fn)
    assert fn.calls == attempts
    assert len(clock.sleeps) == attempts - 1
    note = "".join(caught.value.__notes__)
    assert f"gave up after {attempts} attempt(s)" in note
    assert f"{error.__name__} budget: {attempts} attempts" in note


def test_the_budget_of_the_current_error_applies() -> None:
    """Three transient failures then throttling: the throttling budget (8) allows more."""
    clock = FakeClock()
    fn = Flaky(*[TransientError("t")] * 3, *[Throttled("s")] * 3)
    assert policy(clock, random=0.0).run(fn) == "done"
    assert fn.calls == 7


def test_gives_up_when_the_next_sleep_passes_the_elapsed_budget() -> None:
    clock = FakeClock()
    budgets = ((Throttled, Budget(100, 10.0)),)
    fn = Flaky(*[Throttled("s", retry_after=4.0) for _ in range(10)])
    with pytest.raises(Throttled) as caught:
        policy(clock, budgets=budgets).run(fn)
    assert clock.sleeps == [4.0, 4.0]  # a third sleep would end at 12 s > 10 s
    assert "gave up after 3 attempt(s) over 8.0s" in "".join(caught.value.__notes__)


def test_unlisted_retryable_errors_get_the_default_budget() -> None:
    class Flappy(NotFound):
        retryable = True

    clock = FakeClock()
    fn = Flaky(*[Flappy("f") for _ in range(10)])
    with pytest.raises(Flappy):
        policy(clock, other_retryable=Budget(2)).run(fn)
    assert fn.calls == 2


def test_on_retry_hears_each_retry() -> None:
    clock = FakeClock()
    events: list[RetryEvent] = []
    fn = Flaky(TransientError("a"), TransientError("b"))
    policy(clock).run(fn, on_retry=events.append)
    assert [(e.attempt, e.delay, str(e.error)) for e in events] == [(1, 0.1, "a"), (2, 0.2, "b")]
    assert events[1].elapsed == pytest.approx(0.1)


def test_call_and_wrap_pass_arguments_and_keep_the_name() -> None:
    clock = FakeClock()
    calls: list[tuple[int, str]] = []

    def fetch(a: int, *, b: str) -> str:
        """Docstring kept."""
        calls.append((a, b))
        if len(calls) < 2:
            raise TransientError("once")
        return f"{a}{b}"

    assert policy(clock).call(fetch, 1, b="x") == "1x"
    wrapped = policy(clock).wrap(fetch)
    assert wrapped(2, b="y") == "2y"
    assert calls == [(1, "x"), (1, "x"), (2, "y")]
    assert wrapped.__name__ == "fetch" and wrapped.__doc__ == "Docstring kept."


def test_task_scope_uses_the_same_formula_and_budgets() -> None:
    p = RetryPolicy(task_backoff=Backoff(2.0, 300.0), random=lambda: 1.0)
    assert [p.task_delay(n, TransientError("x")) for n in (1, 2, 3, 20)] == [2.0, 4.0, 8.0, 300.0]
    assert p.task_delay(1, Throttled("x", retry_after=30.0)) == 30.0
    assert p.task_budget(Throttled("x")) == 8
    assert p.task_budget(TransientError("x")) == 4
    assert p.task_budget(NotFound("x")) == 1
    assert p.task_budget(ValueError("a bug")) == 1


def test_bad_budgets_and_backoffs_are_refused() -> None:
    with pytest.raises(ValueError):
        Budget(0)
    with pytest.raises(ValueError):
        Backoff(0.1, 1.0, multiplier=0.5)
    with pytest.raises(ValueError):
        Backoff(-1.0, 1.0)


# -- RetryingBackend ------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    name = f"retry-{uuid.uuid4().hex}"
    backend = MemoryBackend(name)
    yield backend
    drop_store(name)


def test_a_transient_error_is_retried_through_the_backend_and_a_permanent_one_is_not(
    memory: MemoryBackend,
) -> None:
    clock = FakeClock()
    backend = RetryingBackend(memory, policy(clock))
    w = memory.begin("k", 3, 3)
    w.put_part(0, b"abc")
    w.commit()
    memory.inject(lambda: TransientError("reset"), times=2, ops={"read_range"})
    assert backend.read_range("k", 0, 3) == b"abc"
    assert len(clock.sleeps) == 2
    memory.inject(lambda: PermissionDenied("denied"), times=1, ops={"read_range"})
    with pytest.raises(PermissionDenied):
        backend.read_range("k", 0, 3)
    assert len(clock.sleeps) == 2
    assert backend.read_range("k", 0, 3) == b"abc"  # the fault was used up by one attempt


def test_throttling_reaches_the_hook_on_every_answer_and_retry_after_is_a_floor(
    memory: MemoryBackend,
) -> None:
    clock = FakeClock()
    throttles: list[float | None] = []
    successes: list[None] = []
    backend = RetryingBackend(
        memory,
        policy(clock, random=0.0),
        on_throttled=lambda e: throttles.append(e.retry_after),
        on_success=lambda: successes.append(None),
    )
    memory.inject(lambda: Throttled("slow down", retry_after=3.0), times=2, ops={"stat"})
    with pytest.raises(NotFound):
        backend.stat("missing")  # two throttles, then the real answer
    assert throttles == [3.0, 3.0]
    assert clock.sleeps == [3.0, 3.0]
    assert successes == []
    backend.delete("missing")
    assert successes == [None]


def test_the_wrapper_has_exactly_the_inner_backends_optional_protocols(
    memory: MemoryBackend, tmp_path: Path
) -> None:
    protocols = (
        SupportsReadInto,
        SupportsRename,
        SupportsLink,
        SupportsGroupCommit,
        SupportsLocalTree,
    )
    posix = PosixBackend(tmp_path, lustre=False)
    for inner in (memory, posix):
        wrapped = RetryingBackend(inner, RetryPolicy())
        assert [isinstance(wrapped, p) for p in protocols] == [
            isinstance(inner, p) for p in protocols
        ]
        assert wrapped.capabilities == inner.capabilities
        assert wrapped.unwrap() is inner
        with pytest.raises(ValueError, match="already wrapped"):
            RetryingBackend(wrapped, RetryPolicy())
    assert not isinstance(RetryingBackend(memory, RetryPolicy()), SupportsLocalTree)
    assert isinstance(RetryingBackend(posix, RetryPolicy()), SupportsLocalTree)


def test_group_commit_through_the_wrapper_stages_the_inner_writers(tmp_path: Path) -> None:
    wrapped = RetryingBackend(PosixBackend(tmp_path, lustre=False), RetryPolicy())
    assert isinstance(wrapped, SupportsGroupCommit)
    group = wrapped.group_commit()
    writer = group.begin("a/b", 2, 2)
    writer.put_part(0, b"hi")
    group.stage(writer)
    assert set(group.commit_all()) == {"a/b"}
    assert (tmp_path / "a/b").read_bytes() == b"hi"


# -- the SDKs' own retries stay off -----------------------------------------------------------


def test_sdk_retries_are_off() -> None:
    """Built clients, inspected without any request: botocore one attempt, azure-core no
    retries, requests adapters no retries, and every google call passes ``retry=None``."""
    from google.cloud import storage

    from datasync.backends.azure import AzureBackend
    from datasync.backends.gcs import GCSBackend
    from datasync.backends.s3 import S3Backend

    s3 = S3Backend(
        "bucket",
        "",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        region_name="us-east-1",
    )
    assert s3.client.meta.config.retries["total_max_attempts"] == 1
    account = "devstoreaccount1"
    azure = AzureBackend(
        account,
        "container",
        connection_string=(
            f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey=a2V5;"
            f"BlobEndpoint=http://127.0.0.1:9/{account};"
        ),
    )
    pipeline = azure.container_client._pipeline._impl_policies
    retries = [p for p in pipeline if hasattr(p, "total_retries")]
    assert retries and all(p.total_retries == 0 for p in retries)
    gcs = GCSBackend("bucket", "", endpoint="http://127.0.0.1:9")
    for adapter in gcs.client._http.adapters.values():
        assert adapter.max_retries.total == 0
    # google-cloud-storage retries by default per call: each call must turn it off.
    with_retry = {
        name
        for cls in (storage.Blob, storage.Bucket, storage.Client)
        for name, fn in inspect.getmembers(cls, callable)
        if not name.startswith("_") and "retry" in inspect.signature(fn).parameters
    }
    source = Path(inspect.getfile(datasync.backends.gcs)).read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in with_retry
    ]
    assert len(calls) >= 8
    for call in calls:
        retry = {k.arg: k.value for k in call.keywords}.get("retry")
        assert isinstance(retry, ast.Constant) and retry.value is None, ast.unparse(call)
