"""The threads serving model (grpc.server): the servicer's methods are functions and generators, and every
call runs on a thread of the server's pool (of its quick pool, for a method marked `never_waits`), in a
contextvars.Context of its own that grpc.server makes for the call (threads_test checks it: a thread's context
would otherwise carry one call's caller, span and deadline into the next call). What a call must await (a new
token's verification, a downstream call on the process's channels) runs on the process's event loop
(`Threads.run`), so one client chain serves both models (mesh.server._model has the contract).

Every handler is served as a request-streaming one here, headers first or not: grpc.server answers a unary
call without its one message with UNIMPLEMENTED "requires exactly one request message"; read here, it is
INVALID_ARGUMENT, as it is on grpc.aio (whose server instead waits for the rest of a truncated message until
the deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from mesh import watchdog
from mesh.server import _calls
from mesh.server._calls import (
    ADMITTED,
    KINDS,
    UNDECODABLE,
    Messages,
    Refusal,
    kind_of,
    one_answered,
    tolerant,
)
from mesh.server._model import Adding, ServingModel, Wrap
from mesh.server._quick_pool import QuickPool

Result = TypeVar("Result")

# The pool for the methods marked never_waits: a few threads, each taking the next call from the queue while
# it is busy, cost less CPU per call than many idle threads each woken for one (BENCHMARKS.md, "Serving
# model"). More threads would not add CPU: the interpreter runs one at a time. A call waiting for its request
# is not one of them (mesh.server._quick_pool).
QUICK_THREADS = 4


@dataclass(frozen=True)
class Threads:
    """How a call on a thread awaits on the process's event loop, `loop` (a servicer of the threads model gets
    one from Runtime.threads(), for its downstream calls on the process's channels)."""

    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, Result], context: grpc.ServicerContext) -> Result:
        """`coroutine`'s result, awaited on the loop in a copy of the calling thread's context (the call's
        deadline, span and caller: asyncio copies it), and cancelled when the call ends first (the client
        went away, or its deadline passed)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        if not context.add_callback(future.cancel):
            future.cancel()  # the call has already ended
        return future.result()


Method = TypeVar("Method", bound=Callable[..., Any])
_NEVER_WAITS = "mesh_never_waits"


def never_waits(method: Method) -> Method:
    """Marks a servicer method of the threads model that answers from its request and CPU alone (no downstream
    call, no lock held for long, no stream): the server runs it on its few quick threads (QUICK_THREADS)."""
    setattr(method, _NEVER_WAITS, True)
    return method


def _waits(behavior: Callable[..., Any]) -> bool:
    """Whether a handler's behavior may wait (anything not marked `never_waits`)."""
    return not getattr(behavior, _NEVER_WAITS, False)


def _refuse(refusal: Refusal, context: grpc.ServicerContext) -> None:
    context.abort(refusal.code, refusal.message)


_END = object()


def _parsed(
    requests: Iterator[Any], context: grpc.ServicerContext, method: str, messages: Messages
) -> Iterator[Any]:
    for request in requests:
        messages.received += 1
        if request is UNDECODABLE:
            _refuse(_calls.not_a_message(method), context)
        yield request


def _one(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Any:
    for request in requests:
        return request
    _refuse(_calls.no_request(method), context)


def _arriving(
    requests: Iterator[Any], arrival: _calls.Arrival, context: grpc.ServicerContext
) -> Iterator[Any]:
    """`requests`, the first of them within `arrival.seconds` (else the process's watchdog cancels the call,
    which wakes the read with grpc.RpcError: the client sees CANCELLED) and before the arrival ends the wait
    (the same way), then `arrival.arrived()`."""
    bound = watchdog.shared().bound(context, arrival.seconds)
    arrival.waiting(context.cancel)
    try:
        first = next(requests, _END)
    finally:
        bound.done = True
        arrival.waited()
    if first is _END:
        return
    refused = arrival.arrived()
    if refused is not None:
        _refuse(refused, context)
    yield first
    yield from requests


def _reading_after_entry(
    handler: grpc.RpcMethodHandler, method: str, quick: QuickPool | None
) -> grpc.RpcMethodHandler:
    """A unary-request handler served as a request-streaming one, which reads its one request itself; on the
    quick pool, its read is marked for the pool (a late request does not hold one of its few threads)."""
    inner = getattr(handler, kind_of(handler).behavior)

    def reading(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return inner(_one(requests, context, method), context)  # a response, or a response stream

    def reading_quickly(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        assert quick is not None
        return inner(quick.read(lambda: _one(requests, context, method), context), context)

    return KINDS[True, bool(handler.response_streaming)].factory(
        reading if quick is None else reading_quickly,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _ThreadsServer(Adding, grpc.Server):  # type: ignore[misc]
    """A grpc.server with the chain around its handlers (and so, for reflection, not a grpc.aio.Server)."""

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        stopped: threading.Event = self._server.stop(grace)
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self._server.wait_for_termination(timeout))


class ThreadsModel(ServingModel):
    """grpc.server: functions and generators, every call on a thread of a pool of `pool_threads` (the
    `never_waits` methods on QUICK_THREADS quick ones). Made on the process's event loop, which runs what the
    calls await."""

    def __init__(self, pool_threads: int = 8) -> None:
        super().__init__(pool_threads)
        self.threads = Threads(asyncio.get_running_loop())
        self._quick = QuickPool(QUICK_THREADS)

    def server(self, options: Sequence[tuple[str, Any]], max_concurrent_rpcs: int | None = None) -> Any:
        pool = concurrent.futures.ThreadPoolExecutor(self.pool_threads, thread_name_prefix="call")
        return grpc.server(pool, options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)

    def health(self) -> Any:
        return health.HealthServicer()

    def adding(self, server: Any, wrap: Wrap) -> Any:
        return _ThreadsServer(server, wrap)

    def finish(self, pending: _calls.Pending | Refusal, context: Any) -> None:
        if isinstance(pending, Refusal):
            refused: Refusal | None = pending
        else:
            refused = pending.settle(self.threads.run(pending.check(), context))
        if refused is not None:
            _refuse(refused, context)

    async def start(self, server: Any) -> None:
        server.start()

    async def serving(self, health: Any, services: Sequence[str]) -> None:
        for name in ["", *services]:
            health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self, health: Any) -> None:
        health.enter_graceful_shutdown()

    async def stop(self, server: Any, grace: float | None) -> None:
        # The calls draining may still await on this loop (Threads.run): wait off it.
        await asyncio.to_thread(server.stop(grace).wait)

    def wrap(
        self,
        handler: grpc.RpcMethodHandler,
        enter: _calls.Enter,
        after: _calls.After,
        method: str,
        headers_first: bool,
    ) -> grpc.RpcMethodHandler:
        """`enter` always runs before a unary request is read here (the module's docstring says why)."""
        finish = self.finish
        unary_call = not handler.request_streaming and not handler.response_streaming  # metrics: no counts
        client_streams = handler.request_streaming  # as the service defines it, before `_reading_after_entry`
        quick = None if _waits(getattr(handler, kind_of(handler).behavior)) else self._quick
        if not handler.request_streaming:
            handler = _reading_after_entry(handler, method, quick)
        kind = kind_of(handler)
        behavior: Callable[[Any, grpc.ServicerContext], Any] = getattr(handler, kind.behavior)
        deserializer = tolerant(handler.request_deserializer)

        def admitted(
            entered: _calls.Entered, requests: Iterator[Any], context: grpc.ServicerContext
        ) -> Iterator[Any]:
            """The call's admission, before its handler, whatever its kind: what `enter` left pending finished,
            the arrival of its request awaited, a request stream told it is admitted (ADMITTED); then its
            requests."""
            if entered.pending is not None:
                finish(entered.pending, context)
            if entered.arrival is not None:
                requests = _arriving(requests, entered.arrival, context)
            if client_streams:
                context.send_initial_metadata(ADMITTED)
            return requests

        def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            entered = enter(context)
            messages = Messages()
            error: BaseException | None = None
            try:
                requests = admitted(entered, requests, context)
                return behavior(_parsed(requests, context, method, messages), context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                one_answered(after, entered, context, error, None if unary_call else messages)

        def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            entered = enter(context)
            messages = Messages()
            ending = threading.Lock()
            ended = False

            def end(error: BaseException | None) -> None:
                nonlocal ended
                with ending:  # the RPC's end (a grpc thread) and the stream's last step may meet
                    if ended:
                        return
                    ended = True
                after(entered, context, error, messages)

            # A stream the client abandons is not run to its end: end the call's work when the RPC ends.
            context.add_callback(lambda: end(None))
            error: BaseException | None = None
            try:
                requests = admitted(entered, requests, context)
                for messages.sent, response in enumerate(
                    behavior(_parsed(requests, context, method, messages), context), 1
                ):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                end(error)

        served: Any = streaming if handler.response_streaming else unary
        if quick is not None:
            served.experimental_thread_pool = quick  # grpc.server's pool for this method
        return kind.factory(
            served,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
