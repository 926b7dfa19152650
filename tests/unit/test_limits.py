"""Host-wide limits: slots shared across instances and processes, AIMD throttling, token
bucket. Time is a fake clock; ``sleep`` advances it, so nothing here really waits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from datasync.config import LinkConfig, Settings, SiteConfig
from datasync.transfer.limits import Limits, LimitSpec, limits_from_settings


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.on_sleep: list[Callable[[], object]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s
        for hook in list(self.on_sleep):
            hook()


def make(tmp_path: Path, t: FakeTime, **sites: LimitSpec) -> Limits:
    return Limits(tmp_path / "locks", sites, clock=t.clock, sleep=t.sleep, poll_interval=0.01)


def test_slots_are_shared_between_instances(tmp_path: Path) -> None:
    t = FakeTime()
    a = make(tmp_path, t, s3=LimitSpec(concurrency=2))
    b = make(tmp_path, t, s3=LimitSpec(concurrency=2))
    done = threading.Event()

    def third() -> None:
        with b.slot("s3"):
            done.set()

    with a.slot("s3"):
        th = threading.Thread(target=third)
        with b.slot("s3"):
            th.start()
            assert not done.wait(0.2), "a third slot must not be granted while two are held"
    th.join(5)
    assert done.is_set(), "releasing a slot lets the waiter in"


def test_slot_held_by_another_process_counts(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from datasync.transfer.limits import Limits, LimitSpec
        lim = Limits(Path({str(lock_dir)!r}), {{"gcs": LimitSpec(concurrency=1)}})
        with lim.slot("gcs"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        t = FakeTime()
        lim = make(tmp_path, t, gcs=LimitSpec(concurrency=1))
        released = False

        def release_after_some_polls() -> None:
            nonlocal released
            if len(t.slept) == 5 and not released:
                released = True
                proc.kill()  # SIGKILL: the kernel drops its flock
                proc.wait()

        t.on_sleep.append(release_after_some_polls)
        with lim.slot("gcs"):
            pass
        assert released and len(t.slept) >= 5, "the slot was taken only after the holder died"
    finally:
        proc.kill()
        proc.wait()


def test_throttle_halves_then_probes_back_up(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, az=LimitSpec(concurrency=16))
    assert lim.current_limit("az") == 16 and lim.throttled_at("az") is None
    lim.on_throttled("az", retry_after=2.0)
    assert lim.throttled_at("az") == t.now
    assert lim.current_limit("az") == 8
    lim.on_throttled("az", retry_after=2.0)  # same burst (within the window): counts once
    assert lim.current_limit("az") == 8
    t.now += 1.5
    lim.on_throttled("az")
    assert lim.current_limit("az") == 4
    for _ in range(4):
        lim.on_success("az")
    assert lim.current_limit("az") == 5, "one slot back after `limit` successes"
    for _ in range(200):
        lim.on_success("az")
    assert lim.current_limit("az") == 16, "never above the configured ceiling"


def test_throttle_never_below_one_and_state_is_shared(tmp_path: Path) -> None:
    t = FakeTime()
    a = make(tmp_path, t, az=LimitSpec(concurrency=3))
    b = make(tmp_path, t, az=LimitSpec(concurrency=3))
    for _ in range(5):
        a.on_throttled("az", retry_after=0)
        t.now += 2
    assert b.current_limit("az") == 1


def test_retry_after_blocks_new_slots(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, s3=LimitSpec(concurrency=4))
    lim.on_throttled("s3", retry_after=3.0)
    start = t.now
    with lim.slot("s3"):
        pass
    assert t.now - start >= 3.0, "no new operation before retry_after has passed"


def test_unlimited_site_needs_no_slot(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t)
    with lim.slot("anything", src="other"), lim.slot("anything", src="other"):
        pass
    assert t.slept == []


def test_link_limit_applies_to_that_pair_only(tmp_path: Path) -> None:
    t = FakeTime()
    lim = Limits(
        tmp_path / "locks",
        {},
        {("aws", "lustre"): LimitSpec(concurrency=1)},
        clock=t.clock,
        sleep=t.sleep,
    )
    with lim.slot("lustre", src="aws"):
        with lim.slot("lustre", src="gcp"):
            pass  # other link: free
        assert t.slept == []
        t.on_sleep.append(lambda: (_ for _ in ()).throw(RuntimeError("would wait")))
        with pytest.raises(RuntimeError, match="would wait"), lim.slot("lustre", src="aws"):
            pass


def test_token_bucket_rate(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, lustre=LimitSpec(bandwidth_mbps=80))  # 10 MB/s
    moved = 0
    for _ in range(60):
        lim.take_bandwidth(1_000_000, "lustre")
        moved += 1_000_000
    elapsed = sum(t.slept)
    # 10 MB burst, then 10 MB/s: 60 MB take ~5 s.
    assert 4.9 <= elapsed <= 5.1, elapsed
    assert moved / (elapsed + 1) == pytest.approx(10_000_000, rel=0.05)


def test_token_bucket_shared_between_processes_uses_the_slowest(tmp_path: Path) -> None:
    t = FakeTime()
    a = make(tmp_path, t, src=LimitSpec(bandwidth_mbps=8), dst=LimitSpec(bandwidth_mbps=80))
    b = make(tmp_path, t, src=LimitSpec(bandwidth_mbps=8), dst=LimitSpec(bandwidth_mbps=80))
    a.take_bandwidth(1_000_000, "dst", src="src")  # spends src's 1 MB burst
    waited = b.take_bandwidth(1_000_000, "dst", src="src")
    assert waited == pytest.approx(1.0), "the second instance sees the first one's spending"


def test_limits_from_settings(tmp_path: Path) -> None:
    aws = SiteConfig(url="s3://b", links={"lustre": LinkConfig(concurrency=1)})
    lim = limits_from_settings(
        tmp_path, {"lustre": SiteConfig(url="/x", concurrency=3, bandwidth_mbps=100), "aws": aws}
    )
    assert lim.current_limit("lustre") == 3
    assert (tmp_path / "locks").is_dir()
    # The link aws -> lustre allows one stream: a second one waits for the first.
    order: list[str] = []
    with lim.slot("lustre", src="aws"):
        waiter = threading.Thread(target=lambda: _slot(lim, order))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive(), "the link's one slot is held"
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]
    lim.close()


def _slot(lim: Limits, order: list[str]) -> None:
    with lim.slot("lustre", src="aws"):
        order.append("second")


def test_links_to_unknown_sites_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown site"):
        Settings(
            home=Path("/tmp/x"),
            database_url="sqlite://",
            sites={"aws": SiteConfig(url="s3://b", links={"mars": LinkConfig(concurrency=1)})},
        )


# -- lanes: one set of slots for many small operations -------------------------------------------


def _no_wait(t: FakeTime) -> None:
    def refuse() -> None:
        raise RuntimeError("would wait")

    t.on_sleep.append(refuse)


def test_a_lane_holds_one_slot_however_many_operations(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, s3=LimitSpec(concurrency=2))
    other = make(tmp_path, t, s3=LimitSpec(concurrency=2))
    _no_wait(t)
    with lim.lane() as a, lim.lane() as b:
        for _ in range(50):  # re-holding the same pair takes nothing more
            a.hold("s3")
            b.hold("s3")
        assert a.holding == b.holding == ("s3", None)
        # Two lanes hold both slots: a third stream (any instance) must wait.
        with pytest.raises(RuntimeError, match="would wait"), other.slot("s3"):
            pass
    with other.slot("s3"), other.slot("s3"):  # both released on leaving the lanes
        pass


def test_a_lane_switching_pairs_releases_the_old_slots_first(tmp_path: Path) -> None:
    t = FakeTime()
    links = {("aws", "lustre"): LimitSpec(concurrency=1), ("gcp", "lustre"): LimitSpec(1)}
    lim = Limits(tmp_path / "locks", {}, links, clock=t.clock, sleep=t.sleep)
    _no_wait(t)
    with lim.lane() as lane:
        lane.hold("lustre", "aws")
        with pytest.raises(RuntimeError, match="would wait"), lim.slot("lustre", src="aws"):
            pass
        lane.hold("lustre", "gcp")
        with lim.slot("lustre", src="aws"):  # the aws link's slot is free again
            pass
        with pytest.raises(RuntimeError, match="would wait"), lim.slot("lustre", src="gcp"):
            pass


def test_a_lane_retakes_its_slots_after_max_hold(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, s3=LimitSpec(concurrency=4))
    with lim.lane(max_hold=1.0) as lane:
        lane.hold("s3")
        lim.on_throttled("s3", retry_after=5.0)
        t.now += 0.5
        lane.hold("s3")  # within max_hold: keeps going
        assert t.slept == []
        t.now += 0.6
        start = t.now
        lane.hold("s3")  # past max_hold: takes the slot again, so the pause applies
        assert t.now - start >= 3.9, "the throttle's retry_after reached the lane"


def test_a_lane_charges_bandwidth_in_batches_at_the_same_rate(tmp_path: Path) -> None:
    t = FakeTime()
    lim = make(tmp_path, t, lustre=LimitSpec(bandwidth_mbps=8))  # 1 MB/s, 1 MB burst
    with lim.lane(flush_bytes=1_000_000, max_hold=1e9) as lane:
        lane.hold("lustre")
        for _ in range(100):
            lane.charge(100_000)  # 10 MB in small pieces
    # 1 MB burst, then 1 MB/s: ~9 s of sleep, taken in at most 10 settlements, not 100.
    assert 8.9 <= sum(t.slept) <= 9.1, sum(t.slept)
    assert len(t.slept) <= 10
    with pytest.raises(RuntimeError, match="outside hold"):
        lim.lane().charge(1)
