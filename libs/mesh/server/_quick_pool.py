"""The threads model's quick pool (the methods marked `never_waits`): a few threads that take calls from one
queue, where a call whose request is late does not hold one of them.

grpc.server runs a call, unary or not, on a thread of its pool, and the call's first act there is to read its
request: blocked until the message arrives. A few threads are what makes the pool cheap (BENCHMARKS.md,
"Serving model": 4 busy threads taking calls from a queue cost less CPU per call than many idle threads woken
one per call), and also what made it fragile: 4 callers that send their headers and hold back their message
stalled the method for everyone.

So the pool counts `compute` threads that are not waiting for a request. The call's wrapper marks its read
(`read`); a read still waiting after STALLED_READ_SECONDS (seen by the process's watchdog, mesh.watchdog) no
longer counts, and the pool starts another thread to serve its queue, up to `compute + spare` threads in all;
once the read is over, the surplus thread leaves after its call. A read still waiting after `read_seconds` is
ended (the call is cancelled), which gives its thread back. The common path costs two attribute writes.

A subclass of ThreadPoolExecutor because grpc.server takes a method's pool only if it is one
(`experimental_thread_pool`); none of the base class's threads or queue is used.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mesh import watchdog

# A read still waiting this long after it began is a stalled one: its request was not already there, or
# about to be (a request sent with its headers is read in well under a millisecond). Seen at the watchdog's
# next tick (mesh.watchdog.TICK_SECONDS): a call queued behind stalled reads waits at most about 40 ms.
STALLED_READ_SECONDS = 0.020
# Threads a quick pool may add for stalled reads: past this many callers holding their message back at once,
# calls wait for a stalled read to end (READ_SECONDS at most).
SPARE_THREADS = 64
# How long a quick method's request (a ping: at most 64 KiB) may take to arrive after its headers, then the
# call is ended and its thread given back.
READ_SECONDS = 10.0

Result = TypeVar("Result")
_here = threading.local()  # the Slot of the pool thread that runs this code


class _Slot:
    """A pool thread: the read it is waiting for, if any."""

    __slots__ = ("since", "context", "stalled", "cancelled")

    def __init__(self) -> None:
        self.since: float | None = None  # when its read began (time.monotonic()), None when not reading
        self.context: Any = None  # the call whose request it reads
        self.stalled = False  # its read counts as stalled (no longer one of the compute threads)
        self.cancelled: float | None = None  # the read (by `since`) whose call it cancelled


class QuickPool(concurrent.futures.ThreadPoolExecutor):
    def __init__(
        self,
        compute: int,
        *,
        spare: int = SPARE_THREADS,
        read_seconds: float = READ_SECONDS,
        dog: watchdog.Watchdog | None = None,
        thread_name_prefix: str = "quick",
    ) -> None:
        super().__init__(compute + spare, thread_name_prefix=thread_name_prefix)
        self._compute, self._most, self._read_seconds = compute, compute + spare, read_seconds
        self._name = thread_name_prefix
        self._dog = dog or watchdog.shared()
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._work: collections.deque[tuple[concurrent.futures.Future[Any], Callable[..., Any], Any]] = (
            collections.deque()
        )
        self._slots: list[_Slot] = []  # one per live thread
        self._idle = 0  # threads waiting for work
        self._stalled = 0  # slots whose read is stalled
        self._started = 0  # threads ever started (their names)
        self._closed = False
        # Reads begun, counted without the lock (a lost count only delays the watchdog's rest by a tick), and
        # the count at the last tick: under load the watchdog keeps ticking rather than stop and be woken.
        self._begun = 0
        self._begun_at_tick = 0
        self._dog.watch(self)

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return len(self._slots)

    def submit(
        self, fn: Callable[..., Result], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Result]:
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.append((future, fn, (args, kwargs)))
            if self._idle:
                self._work_ready.notify()
            elif len(self._slots) < min(self._most, self._compute + self._stalled):
                self._start()
        return future

    def read(self, reading: Callable[[], Result], context: Any) -> Result:
        """`reading()` (the read of `context`'s request, on this pool's thread), marked for the watchdog."""
        slot: _Slot | None = getattr(_here, "slot", None)
        if slot is None:  # not on a pool thread (a test's direct call)
            return reading()
        slot.context = context
        slot.since = time.monotonic()
        self._begun += 1
        if not self._dog.ticking:
            self._dog.tick_soon()
        try:
            return reading()
        finally:
            slot.since = None
            slot.context = None
            if slot.stalled:
                with self._lock:
                    self._unstall(slot)

    def tick(self, now: float) -> bool:
        """Stalled reads counted out (and threads started for the queue), overdue ones ended; whether any
        read is in progress or has begun since the last tick. Runs on the watchdog's thread."""
        overdue = []
        reading = self._begun != self._begun_at_tick
        self._begun_at_tick = self._begun
        with self._lock:
            for slot in self._slots:
                since = slot.since
                if since is None:
                    continue
                reading = True
                if not slot.stalled and now - since > STALLED_READ_SECONDS:
                    slot.stalled = True
                    self._stalled += 1
                    # The reader clears `since`, then reads `stalled` without the lock: had it ended meanwhile,
                    # one of the two sees the other's write, and `_unstall` runs once under the lock.
                    if slot.since is not since:
                        self._unstall(slot)
                if now - since > self._read_seconds and slot.cancelled is not since:
                    slot.cancelled = since
                    overdue.append(slot.context)
            while (
                self._work
                and not self._idle
                and len(self._slots) < min(self._most, self._compute + self._stalled)
            ):
                self._start()
        for context in overdue:
            if context is not None:
                context.cancel()  # wakes the read (grpc.RpcError); the client sees CANCELLED
        return reading

    def _unstall(self, slot: _Slot) -> None:
        if slot.stalled:
            slot.stalled = False
            self._stalled -= 1

    def _start(self) -> None:
        """A new thread (lock held)."""
        slot = _Slot()
        self._slots.append(slot)
        self._started += 1
        name = f"{self._name}_{self._started}"
        threading.Thread(target=self._serve, args=(slot,), name=name, daemon=True).start()

    def _serve(self, slot: _Slot) -> None:
        _here.slot = slot
        while True:
            with self._lock:
                while not self._work:
                    if self._closed or self._surplus():
                        self._slots.remove(slot)
                        return
                    self._idle += 1
                    self._work_ready.wait()
                    self._idle -= 1
                if self._surplus():
                    # Too many threads since a stalled read ended: this one leaves the queue to the others.
                    self._slots.remove(slot)
                    if self._idle:
                        self._work_ready.notify()
                    return
                future, fn, (args, kwargs) = self._work.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs

    def _surplus(self) -> bool:
        return len(self._slots) > self._compute + self._stalled

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._work_ready.notify_all()
        super().shutdown(wait, cancel_futures=cancel_futures)
