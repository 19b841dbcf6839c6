"""One thread per process that ends the calls of the threads model (grpc.server) whose request is late.

A grpc.server call reads its request on the thread that runs it, blocked until the message arrives, for as
long as the caller likes: a sync ServicerContext's `cancel()` ends the call and wakes that read (it raises
grpc.RpcError, and the client sees CANCELLED). One shared thread does it for every such call, instead of a
timer thread per call: it sleeps until the earliest deadline (`bound`), and, while a quick pool's threads are
reading (mesh.server._quick_pool), wakes every TICK_SECONDS to look at them (`tick`). Idle, it costs a sleeping
thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Protocol

# How often the watchdog looks at the quick pools while their threads read: a read still waiting after a tick
# or two is taken for a stalled one (mesh.server._quick_pool.STALLED_READ_SECONDS). Each tick takes the interpreter
# from a busy thread: 50 a second cost no CPU per call that interleaved A/B rounds could tell from noise.
TICK_SECONDS = 0.020


class Ticked(Protocol):
    def tick(self, now: float) -> bool:
        """Looks at its reads at `now` (time.monotonic()); whether any is still in progress."""
        ...


class Bound:
    """A read the watchdog ends at its deadline unless `done` is set first."""

    __slots__ = ("context", "done")

    def __init__(self, context: Any) -> None:
        self.context = context
        self.done = False


class Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._deadlines: list[tuple[float, int, Bound]] = []
        self._order = itertools.count()  # ties in the heap never compare two Bounds
        self._ticked: list[Ticked] = []
        self._thread: threading.Thread | None = None
        # Read without the lock on the readers' path (mesh.server._quick_pool): set before they need a tick.
        self.ticking = False

    def bound(self, context: Any, seconds: float) -> Bound:
        """`context`'s call is cancelled in `seconds` unless the returned Bound is `done` by then."""
        bound = Bound(context)
        with self._lock:
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, next(self._order), bound))
            if self._deadlines[0][2] is bound:
                self._wake.notify()
            self._started()
        return bound

    def watch(self, ticked: Ticked) -> None:
        """`ticked.tick` runs every TICK_SECONDS while `tick_soon` has been called and it has reads."""
        with self._lock:
            self._ticked.append(ticked)

    def tick_soon(self) -> None:
        """Start ticking (a reader began while the watchdog was not ticking)."""
        with self._lock:
            if not self.ticking:
                self.ticking = True
                self._wake.notify()
            self._started()

    def _started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mesh-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                due = self._due(time.monotonic())
                ticked = list(self._ticked) if self.ticking else []
            for bound in due:
                if not bound.done:
                    bound.context.cancel()
            if ticked:
                now = time.monotonic()
                busy = any([each.tick(now) for each in ticked])  # every pool ticked, not just the first busy
                if not busy:
                    # A reader sets its start, then reads `ticking`; here `ticking` is cleared, then the
                    # readers are looked at again: one of the two sees the other's write.
                    self.ticking = False
                    if any([each.tick(time.monotonic()) for each in ticked]):
                        self.ticking = True

    def _due(self, now: float) -> list[Bound]:
        """The bounds past their deadline, after waiting (lock held) for the next deadline or tick."""
        due = []
        while self._deadlines and self._deadlines[0][0] <= now:
            due.append(heapq.heappop(self._deadlines)[2])
        if due:
            return due
        timeout = self._deadlines[0][0] - now if self._deadlines else None
        if self.ticking:
            timeout = TICK_SECONDS if timeout is None else min(timeout, TICK_SECONDS)
        self._wake.wait(timeout)
        return due


_SHARED = Watchdog()


def shared() -> Watchdog:
    """The process's watchdog (its thread starts with its first use)."""
    return _SHARED
