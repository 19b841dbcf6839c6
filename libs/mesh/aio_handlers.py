"""The handler wrapper of the grpc.aio model: the handler is a coroutine (one response, or a stream written
with `await context.write()`) or an async generator, and every call runs in its own task."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mesh.handler_kinds import (
    KINDS,
    UNDECODABLE,
    After,
    Arrival,
    Enter,
    Messages,
    kind_of,
    late_request,
    no_request,
    not_a_message,
    one_answered,
    tolerant,
)


async def _admitted(context: grpc.aio.ServicerContext) -> None:
    """Tell a client that streams its requests that its call was admitted (the response headers), so that it
    can wait for the verdict before it writes: a message written while the server refuses the call can turn
    the refusal into gRPC core's INTERNAL "Internal error from Core" on the client (a grpc.aio race)."""
    await context.send_initial_metadata(())


async def _parsed(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str, messages: Messages
) -> AsyncIterator[Any]:
    async for request in requests:
        messages.received += 1
        if request is UNDECODABLE:
            await not_a_message(method).wait(context)
        yield request


async def _one(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> Any:
    async for request in requests:
        return request
    await no_request(method).wait(context)


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
        await late_request(arrival).wait(context)
    refused = arrival.arrived()
    if refused is not None:
        await refused.wait(context)
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
        await refused.wait(context)
    return request


def _reading_after_entry(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A unary-request handler served as a request-streaming one, which reads its one request itself.

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


def wrap(
    handler: grpc.RpcMethodHandler, enter: Enter, after: After, method: str, headers_first: bool
) -> grpc.RpcMethodHandler:
    """See mesh.handlers.wrap."""
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
            await not_a_message(method).wait(context)
        return request

    def ready(request: Any) -> bool:  # the common case: no coroutine on the hot path of a unary request
        return not streaming_requests and request is not UNDECODABLE

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        entered = enter(context)
        # A client stream's messages are counted; a unary call's are not (one each way).
        messages = Messages() if streaming_requests else None
        error: BaseException | None = None
        try:
            if entered.pending is not None:
                await entered.pending.wait(context)
            if entered.arrival is not None:
                request = await _on_arrival(request, entered.arrival, context, streaming_requests)
            if client_streams:
                await _admitted(context)
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
            if entered.pending is not None:
                await entered.pending.wait(context)
            if entered.arrival is not None:
                request = await _on_arrival(request, entered.arrival, context, streaming_requests)
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
            if entered.pending is not None:
                await entered.pending.wait(context)
            if entered.arrival is not None:
                request = await _on_arrival(request, entered.arrival, context, streaming_requests)
            if client_streams:
                await _admitted(context)
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
