"""QuickPool: a thread waiting for its call's request is not one of the pool's compute threads; the pool adds
threads for such reads up to its bound, ends reads past their time, and falls back to its few threads."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest

from mesh.server._quick_pool import QuickPool


class Call:
    """What the pool is given of a call (a ServicerContext's `cancel`): its request arrives when `arrive` is
    set, or the read ends when the call is cancelled."""

    def __init__(self) -> None:
        self.arrive = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.arrive.set()

    def read(self) -> str:
        self.arrive.wait(30)
        return "cancelled" if self.cancelled else "request"


@pytest.fixture
def pool() -> Iterator[QuickPool]:
    made = QuickPool(2, spare=3, read_seconds=30, thread_name_prefix="test-quick")
    yield made
    made.shutdown(wait=False)


def held_reads(pool: QuickPool, count: int) -> tuple[list[Call], list[concurrent.futures.Future[str]]]:
    held = [Call() for _ in range(count)]
    return held, [pool.submit(pool.read, call.read, call) for call in held]


def test_calls_go_past_reads_that_wait_for_their_request(pool: QuickPool) -> None:
    held, reads = held_reads(pool, 2)  # as many as the pool's compute threads
    assert pool.submit(lambda: "served").result(timeout=5) == "served"
    assert not any(read.done() for read in reads)
    for call in held:
        call.arrive.set()
    assert [read.result(timeout=5) for read in reads] == ["request", "request"]


def test_threads_for_waiting_reads_are_bounded_and_leave_when_the_reads_end(pool: QuickPool) -> None:
    held, reads = held_reads(pool, 5)  # every thread the pool may have: 2 + 3 spare
    waiting = pool.submit(lambda: "served")
    with pytest.raises(concurrent.futures.TimeoutError):
        waiting.result(timeout=0.5)  # no sixth thread
    assert pool.threads == 5
    held[0].arrive.set()
    assert waiting.result(timeout=5) == "served"
    for call in held[1:]:
        call.arrive.set()
    assert [read.result(timeout=5) for read in reads] == ["request"] * 5
    # The surplus leaves after its call; what stays is the pool's few threads.
    for _ in range(100):
        if pool.threads == 2:
            break
        pool.submit(time.sleep, 0.05).result(timeout=5)
    assert pool.threads == 2


def test_a_read_past_its_time_is_ended() -> None:
    pool = QuickPool(1, spare=1, read_seconds=0.2, thread_name_prefix="test-quick")
    try:
        held, reads = held_reads(pool, 1)
        assert reads[0].result(timeout=10) == "cancelled"
        assert held[0].cancelled
    finally:
        pool.shutdown(wait=False)
