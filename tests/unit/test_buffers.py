"""The per-process buffer budget: bounded, blocking, reusing buffers of >= 1 MiB."""

from __future__ import annotations

import threading
import time

import pytest

from datasync.transfer.buffers import MIN_BUFFER, BufferPool, BufferTimeout, PoolBuffer

MiB = 1024 * 1024


def test_buffers_are_at_least_one_mib_and_rounded_to_mib() -> None:
    pool = BufferPool(8 * MiB)
    with pool.lease(10) as small, pool.lease(MiB + 1) as odd:
        assert len(small) == MIN_BUFFER
        assert len(odd) == 2 * MiB


def test_released_buffers_are_reused() -> None:
    pool = BufferPool(4 * MiB)
    for _ in range(20):
        with pool.lease(MiB), pool.lease(MiB):
            pass
    assert pool.allocated == 2
    assert pool.in_use_bytes == 0


def test_acquire_blocks_until_budget_frees() -> None:
    pool = BufferPool(2 * MiB)
    a = pool.acquire(MiB)
    b = pool.acquire(MiB)
    got: list[PoolBuffer] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(MiB)))
    t.start()
    time.sleep(0.1)
    assert not got, "acquire must block while the budget is spent"
    pool.release(a)
    t.join(5)
    assert got and got[0] is a, "the released buffer is handed out again"
    pool.release(b)
    pool.release(got[0])


def test_timeout_raises_with_reason() -> None:
    pool = BufferPool(MiB)
    with pool.lease(MiB), pytest.raises(BufferTimeout, match="in use"):
        pool.acquire(MiB, timeout=0.05)


def test_budget_never_exceeded_under_many_threads() -> None:
    pool = BufferPool(4 * MiB)
    peak = 0
    lock = threading.Lock()

    def work(size: int) -> None:
        nonlocal peak
        for _ in range(50):
            with pool.lease(size), lock:
                peak = max(peak, pool.in_use_bytes)

    threads = [threading.Thread(target=work, args=(s * MiB,)) for s in (1, 1, 2, 2, 3, 1, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak <= 4 * MiB
    assert pool.in_use_bytes == 0


def test_oversized_request_runs_alone() -> None:
    pool = BufferPool(2 * MiB)
    with pool.lease(5 * MiB) as big:
        assert len(big) == 5 * MiB
        with pytest.raises(BufferTimeout):
            pool.acquire(MiB, timeout=0.05)
    with pool.lease(MiB):
        pass


def test_idle_buffers_of_other_sizes_make_room() -> None:
    pool = BufferPool(3 * MiB)
    with pool.lease(MiB), pool.lease(MiB), pool.lease(MiB):
        pass
    # three idle 1 MiB buffers must be dropped to make room for a 3 MiB one
    with pool.lease(3 * MiB) as buf:
        assert len(buf) == 3 * MiB


def test_budget_smaller_than_a_buffer_is_refused() -> None:
    with pytest.raises(ValueError):
        BufferPool(1000)


def test_buffers_are_page_aligned_for_direct_io() -> None:
    import ctypes
    import mmap

    pool = BufferPool(8 * MiB)
    with pool.lease(3 * MiB) as a, pool.lease(MiB) as b:
        for buf in (a, b):
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            assert address % mmap.PAGESIZE == 0
            del address
