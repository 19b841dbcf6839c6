"""The end of an instance's serving, in Cloud Run's 10 s between SIGTERM and SIGKILL, losing no call.

1. Lame duck (SHUTDOWN_LAME_DUCK_SECONDS): health answers NOT_SERVING at once, and every call is still served
   as before, so that front ends that health-check (Envoy, Kubernetes) move their traffic away first.
2. Closing: a new call is taken in but held before its handler runs, until none has come for QUIET_SECONDS
   (at most CLOSING_SECONDS), while the calls in flight go on.
3. gRPC's own shutdown (GOAWAY, listener closed); once the GOAWAY is out, the held calls and any later ones are
   refused with UNAVAILABLE ("retry on another instance"; their handler never ran); the calls in flight get the
   rest of the grace (SHUTDOWN_GRACE_SECONDS, counted from the end of the lame duck), then are cut.

Why steps 2 and 3 so: gRPC core's shutdown ends every call it has taken in but not yet handed to the
application (its pending queue, full under load, and any stream that arrives before its client has read the
GOAWAY) with CANCELLED, a status callers do not retry (grpc/grpc#41785; the proposed fix, #41786, would make it
UNAVAILABLE). grpc.aio hands calls over one loop turn at a time, so at SIGTERM under load most of its calls in
flight sat in that queue: measured here, 126 CANCELLED per SIGTERM on routeguide and 20 on ping (threads),
with 128 calls kept in flight. A call refused at once would only bring its caller's retry back into that queue;
a held call keeps its caller waiting, so the queue empties, and its refusal comes after the GOAWAY on the same
connection: the retry goes elsewhere (or to a refused connection: UNAVAILABLE, never started).

The drain's one log line says how many calls were in flight when closing began, how many of them finished and
how many were cut at the grace's end, and how many new calls were refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from mesh.server._calls import After, Enter, Refusal

# No new call for this long: gRPC's pending queue is empty and the callers are waiting on held calls (or gone).
QUIET_SECONDS = 0.1
# Callers that keep opening calls (more than the server can hold) do not delay gRPC's shutdown longer than this.
CLOSING_SECONDS = 1.0
# From gRPC's shutdown to the refusal of the held calls: its GOAWAY reaches their clients first.
GOAWAY_SECONDS = 0.05
POLL_SECONDS = 0.02

REFUSED = Refusal(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another instance")


class _Refused:
    """What `enter` leaves for `after` for a call refused at once (after the GOAWAY)."""

    __slots__ = ()
    pending = REFUSED


class _Held:
    """What `enter` leaves for `after` for a call that came while closing, and what it settles before its
    handler (mesh.server._calls.Pending, on the process's event loop whatever the serving model): a wait for
    the GOAWAY (bounded, in case the drain never gets there), then the refusal."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.released: asyncio.Event | None = None  # made on the loop by Drain.close, before a call is held

    @property
    def pending(self) -> _Held:
        return self

    async def check(self) -> None:
        if self.released is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.limit)

    def settle(self, checked: None) -> Refusal:
        return REFUSED

    def release(self) -> None:
        if self.released is not None:
            self.released.set()


_REFUSED = _Refused()


@dataclass(frozen=True)
class Drained:
    """What a drain did: calls in flight when closing began, those cut at the grace's end, new calls refused."""

    in_flight: int
    cut: int
    refused: int

    @property
    def finished(self) -> int:
        return self.in_flight - self.cut


class Drain:
    """The calls of one server in flight, counted from any thread; once closed, new calls are held, then
    refused (see the module).

    `around` wraps a chain's `enter`/`after` (mesh.server._chain): one lock and two counts per call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing: _Held | _Refused | None = None  # what a new call gets: None while serving
        self._held = _Held(CLOSING_SECONDS + GOAWAY_SECONDS + 1.0)
        self.in_flight = 0  # calls inside their handler (held and refused ones are not counted)
        self.arrived = 0  # every call that reached the chain, held and refused ones too
        self.refused = 0

    def around(self, enter: Enter, after: After) -> tuple[Enter, After]:
        def entering(context: Any) -> Any:
            with self._lock:
                self.arrived += 1
                if self._closing is not None:
                    self.refused += 1
                    return self._closing
                self.in_flight += 1
            return enter(context)

        def leaving(entered: Any, context: Any, error: BaseException | None, messages: Any) -> None:
            if entered is self._held or entered is _REFUSED:
                return
            with self._lock:
                self.in_flight -= 1
            after(entered, context, error, messages)

        return entering, leaving

    def close(self) -> int:
        """From now on new calls are held (on this loop, for grpc.aio); the calls in flight now."""
        self._held.released = asyncio.Event()
        with self._lock:
            self._closing = self._held
            return self.in_flight

    def release(self) -> None:
        """The held calls, and every later one, refused."""
        with self._lock:
            self._closing = _REFUSED
        self._held.release()

    async def quiet(self, within: float) -> None:
        """Returns once no call has arrived for QUIET_SECONDS, or after `within` seconds."""
        deadline = time.monotonic() + within
        seen, since = self.arrived, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < QUIET_SECONDS:
            await asyncio.sleep(POLL_SECONDS)
            if self.arrived != seen:
                seen, since = self.arrived, time.monotonic()

    async def idle(self, within: float) -> int:
        """Returns once no call is in flight, or after `within` seconds: the calls still in flight."""
        deadline = time.monotonic() + within
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        return self.in_flight

    async def run(self, stop_server: Callable[[float], Awaitable[None]], grace: float) -> Drained:
        """Steps 2 and 3 (see the module), within `grace` seconds: closes, then stops the server with
        `stop_server(seconds)` (gRPC's shutdown; called again with 0, it cuts the calls left)."""
        deadline = time.monotonic() + grace
        in_flight = self.close()
        try:
            await self.quiet(min(CLOSING_SECONDS, grace))
            # gRPC's own grace is longer than ours: the calls still in flight at our deadline are counted,
            # then cut by the second call, before gRPC's timer would cut them.
            stopping = asyncio.ensure_future(stop_server(max(0.0, deadline - time.monotonic()) + 1.0))
            await asyncio.sleep(GOAWAY_SECONDS)
        finally:
            self.release()
        cut = await self.idle(max(0.0, deadline - time.monotonic()))
        if cut:
            await stop_server(0.0)
        await stopping
        return Drained(in_flight, cut, self.refused)
