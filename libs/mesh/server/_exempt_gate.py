"""The exempt gate: how calls that take no token (health Check, which Cloud Run's probes call) get in, on
either serving model.

Such a call is admitted from its headers like any other (mesh.server._chain), then waits for its request: at
most EXEMPT_READ_SECONDS, and before EXEMPT_CONCURRENCY newer such calls wait for theirs (the oldest is ended
to make room). Only once its (tiny, capped) request has arrived does it take one of EXEMPT_CONCURRENCY slots,
held until it ends; past them it is refused at once. A caller that holds its requests back therefore holds no
slot, and at most EXEMPT_CONCURRENCY of gRPC's MAX_CONCURRENT_RPCS (and, on threads, as many pool threads) for
at most a second each: the probe, which sends its request with its headers, always gets in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from mesh.server._calls import Refusal

# Calls that take no token, in flight at once: enough for Cloud Run's probes (one a second at most), too few
# to take the server's MAX_CONCURRENT_RPCS from the calls it authenticates. A call takes its slot once its
# request has arrived; as many again may wait for theirs (Gate).
EXEMPT_CONCURRENCY = 16
# How long a call that takes no token may wait for its (tiny) request after its headers: a probe sends both at
# once; a caller that holds its request back is ended (DEADLINE_EXCEEDED on grpc.aio, CANCELLED on threads).
EXEMPT_READ_SECONDS = 1.0


class Gate:
    """At most `limit` calls inside at once, the others refused at once; and at most `limit` calls waiting for
    their request to come in, the oldest of them ended to make room for a new one (from any thread).

    A call waiting for its request holds a slot of gRPC's MAX_CONCURRENT_RPCS (and, on threads, a pool
    thread): a bounded wait alone would let callers that hold their requests back take them all, a second at
    a time. Ending the oldest rather than refusing the newest keeps the door open to the probe, which sends its
    request at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._full = Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many calls without a token in flight (at most {limit}); retry later",
        )
        self._lock = threading.Lock()
        self._waiting: dict[Arrival, Callable[[], None]] = {}  # oldest first

    def enter(self) -> Refusal | None:
        """None when the call is in (then `leave` when it ends), else its refusal."""
        return None if self._slots.acquire(blocking=False) else self._full

    def leave(self) -> None:
        self._slots.release()

    def wait(self, arrival: Arrival, end: Callable[[], None]) -> None:
        with self._lock:
            self._waiting[arrival] = end
            oldest = next(iter(self._waiting.items())) if len(self._waiting) > self.limit else None
            if oldest is not None:
                del self._waiting[oldest[0]]
        if oldest is not None:
            oldest[1]()

    def waited(self, arrival: Arrival) -> None:
        with self._lock:
            self._waiting.pop(arrival, None)


class Arrival:
    """An exempt call's way through the gate (mesh.server._calls.Arrival): its request within `seconds` (and
    before `limit` newer calls wait for theirs), then a slot, held until the call ends."""

    __slots__ = ("_gate", "seconds", "_inside")

    def __init__(self, gate: Gate, seconds: float) -> None:
        self._gate, self.seconds, self._inside = gate, seconds, False

    def waiting(self, end: Callable[[], None]) -> None:
        self._gate.wait(self, end)

    def waited(self) -> None:
        self._gate.waited(self)

    def arrived(self) -> Refusal | None:
        refused = self._gate.enter()
        self._inside = refused is None
        return refused

    def leave(self) -> None:
        if self._inside:
            self._inside = False
            self._gate.leave()
