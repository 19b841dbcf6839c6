"""The grpc.aio serving model: the servicer's methods are coroutines (one response, or a stream written with
`await context.write()`) or async generators, and every call runs in its own task on the process's event
loop (mesh.server._model has the contract)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from mesh.server._calls import (
    ADMITTED,
    KINDS,
    UNDECODABLE,
    After,
    Arrival,
    Enter,
    Entered,
    Messages,
    Pending,
    Refusal,
    kind_of,
    late_request,
    no_request,
    not_a_message,
    one_answered,
    tolerant,
)
from mesh.server._model import Adding, ServingModel, Wrap


async def _refuse(refusal: Refusal, context: grpc.aio.ServicerContext) -> None:
    await context.abort(refusal.code, refusal.message)


async def _parsed(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str, messages: Messages
) -> AsyncIterator[Any]:
    async for request in requests:
        messages.received += 1
        if request is UNDECODABLE:
            await _refuse(not_a_message(method), context)
        yield request


async def _one(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> Any:
    async for request in requests:
        return request
    await _refuse(no_request(method), context)


async def _arriving(
    requests: AsyncIterator[Any], arrival: Arrival, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """`requests`, the first of them within `arrival.seconds` and before the arrival ends the wait (else
    DEADLINE_EXCEEDED), then `arrival.arrived()`."""
    iterator = requests.__aiter__()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(arrival.seconds) as timeout:
            arrival.waiting(lambda: timeout.reschedule(loop.time()))
            try:
                first = await iterator.__anext__()
            finally:
                arrival.waited()
    except StopAsyncIteration:
        return
    except TimeoutError:
        await _refuse(late_request(arrival), context)
    refused = arrival.arrived()
    if refused is not None:
        await _refuse(refused, context)
    yield first
    async for request in iterator:
        yield request


async def _on_arrival(
    request: Any, arrival: Arrival, context: grpc.aio.ServicerContext, streaming_requests: bool
) -> Any:
    """The call's request(s) with `arrival` applied: to the first of a stream (as it is read), or at once to a
    request grpc has already read."""
    if streaming_requests:
        return _arriving(request, arrival, context)
    refused = arrival.arrived()
    if refused is not None:
        await _refuse(refused, context)
    return request


def _reading_after_entry(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A unary-request handler served as a request-streaming one, which reads its one request itself (what
    the threads model does with every unary-request handler).

    grpc reads a unary request whole (up to the message size limit) before its handler, and so `enter`, runs;
    a request-streaming handler runs before any message is read. Served this way, `enter` decides from the
    call's headers alone, and a call it refuses is answered at once, its request never read."""
    inner = getattr(handler, kind_of(handler).behavior)

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await inner(await _one(requests, context, method), context)

    async def writing(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await inner(await _one(requests, context, method), context)

    async def streaming(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for response in inner(await _one(requests, context, method), context):
            yield response

    return KINDS[True, bool(handler.response_streaming)].factory(
        _serving(handler, inner, unary, writing, streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _serving(handler: grpc.RpcMethodHandler, inner: Any, unary: Any, writing: Any, streaming: Any) -> Any:
    """Which of three wrappers serves `inner`: one response is awaited (`unary`); a response stream is either
    written by a coroutine with `await context.write()` (`writing`: grpc's own health Watch does so) or
    yielded by an async generator (`streaming`)."""
    if not handler.response_streaming:
        return unary
    return writing if inspect.iscoroutinefunction(inner) else streaming


def _wrap(
    handler: grpc.RpcMethodHandler, enter: Enter, after: After, method: str, headers_first: bool
) -> grpc.RpcMethodHandler:
    """See ServingModel.wrap."""
    unary_call = not handler.request_streaming and not handler.response_streaming  # metrics: no counts
    client_streams = handler.request_streaming  # as the service defines it, before `_reading_after_entry`
    if headers_first and not handler.request_streaming:
        handler = _reading_after_entry(handler, method)
    kind = kind_of(handler)
    behavior = getattr(handler, kind.behavior)
    deserializer = tolerant(handler.request_deserializer)
    streaming_requests = handler.request_streaming

    async def checked(request: Any, context: grpc.aio.ServicerContext, messages: Messages | None) -> Any:
        if streaming_requests:
            assert messages is not None
            return _parsed(request, context, method, messages)
        if request is UNDECODABLE:
            await _refuse(not_a_message(method), context)
        return request

    async def admitted(entered: Entered, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The call's admission, before its handler, whatever its kind: what `enter` left pending finished,
        the arrival of its request awaited, a request stream told it is admitted (mesh.server._calls.ADMITTED);
        then its request(s). Not a step of the common unary call, which costs no coroutine."""
        if entered.pending is not None:
            await _finish(entered.pending, context)
        if entered.arrival is not None:
            request = await _on_arrival(request, entered.arrival, context, streaming_requests)
        if client_streams:
            await context.send_initial_metadata(ADMITTED)
        return request

    def ready(request: Any) -> bool:  # the common case: no coroutine on the hot path of a unary request
        return not streaming_requests and request is not UNDECODABLE

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        entered = enter(context)
        # A client stream's messages are counted; a unary call's are not (one each way).
        messages = Messages() if streaming_requests else None
        error: BaseException | None = None
        try:
            if client_streams or entered.pending is not None or entered.arrival is not None:
                request = await admitted(entered, request, context)
            return await behavior(
                (request if ready(request) else await checked(request, context, messages)), context
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            one_answered(after, entered, context, error, None if unary_call else messages)

    async def writing(request: Any, context: grpc.aio.ServicerContext) -> None:
        entered = enter(context)
        messages = Messages(0 if streaming_requests else 1)  # what it writes is not seen here
        error: BaseException | None = None
        try:
            if client_streams or entered.pending is not None or entered.arrival is not None:
                request = await admitted(entered, request, context)
            await behavior(
                (request if ready(request) else await checked(request, context, messages)), context
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            after(entered, context, error, messages)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        entered = enter(context)
        messages = Messages(0 if streaming_requests else 1)
        ended = False

        def end(error: BaseException | None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                after(entered, context, error, messages)

        # A stream the client abandons while this generator waits at `yield` is not closed by grpc.aio;
        # it is finalized whenever the garbage collector gets to it. End the call's work when the RPC ends.
        context.add_done_callback(lambda _: end(None))
        try:
            if client_streams or entered.pending is not None or entered.arrival is not None:
                request = await admitted(entered, request, context)
            async for response in behavior(
                (request if ready(request) else await checked(request, context, messages)), context
            ):
                messages.sent += 1
                yield response
        except BaseException as exc:
            end(exc)
            raise
        end(None)

    return kind.factory(
        _serving(handler, behavior, unary, writing, streaming),
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


async def _finish(pending: Pending | Refusal, context: grpc.aio.ServicerContext) -> None:
    refused = pending if isinstance(pending, Refusal) else pending.settle(await pending.check())
    if refused is not None:
        await _refuse(refused, context)


class _AsyncioServer(Adding, grpc.aio.Server):  # type: ignore[misc]
    """A grpc.aio server with the chain around its handlers, a grpc.aio.Server for reflection's isinstance."""

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self._server.wait_for_termination(timeout))


class AsyncioModel(ServingModel):
    """grpc.aio: coroutines and async generators, every call a task on the process's event loop."""

    def server(self, options: Sequence[tuple[str, Any]], max_concurrent_rpcs: int | None = None) -> Any:
        return grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)

    def health(self) -> Any:
        return health.aio.HealthServicer()

    def adding(self, server: Any, wrap: Wrap) -> Any:
        return _AsyncioServer(server, wrap)

    def wrap(
        self, handler: grpc.RpcMethodHandler, enter: Enter, after: After, method: str, headers_first: bool
    ) -> grpc.RpcMethodHandler:
        return _wrap(handler, enter, after, method, headers_first)

    def finish(self, pending: Pending | Refusal, context: Any) -> Any:
        return _finish(pending, context)

    async def start(self, server: Any) -> None:
        await server.start()

    async def serving(self, health: Any, services: Sequence[str]) -> None:
        for name in ["", *services]:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self, health: Any) -> None:
        await health.enter_graceful_shutdown()

    async def stop(self, server: Any, grace: float | None) -> None:
        await server.stop(grace)
