"""Wrapping a gRPC method handler of any of the four kinds with code that runs inside the call.

mesh.server_chain wraps each method's handler once, when the service is added: the wrapper runs inside the
call, with its ServicerContext (metadata, deadline) and in the handler's own context (the ContextVars the
handler reads: caller, deadline, span).

The wrapper also answers a request that does not parse with INVALID_ARGUMENT and a fixed message. grpcio's
aio server would answer UNKNOWN "Unexpected <class DecodeError>" and log a traceback per call: a lever for any
client to flood the logs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc


class Entered(Protocol):
    """What `enter` leaves for `after`; `pending`: what the call must await before its handler runs (e.g. its
    caller's verification), None in the common case, so that case costs no coroutine."""

    @property
    def pending(self) -> Awaitable[None] | None: ...


class Messages:
    """The messages a streaming call has received and sent so far (counted by the wrapper)."""

    __slots__ = ("received", "sent")

    def __init__(self, received: int = 0) -> None:
        self.received = received
        self.sent = 0


# Runs first inside every call, with the call's context.
Enter = Callable[[grpc.aio.ServicerContext], Entered]
# Runs last inside every call: what `enter` returned, the call's context, what the handler raised (None if
# nothing), and the messages of a streaming call (None for a unary one).
After = Callable[[Any, grpc.aio.ServicerContext, BaseException | None, Messages | None], None]


class _Kind(NamedTuple):
    behavior: str  # the RpcMethodHandler attribute that holds the servicer's method
    factory: Callable[..., grpc.RpcMethodHandler]  # what makes a handler of this kind


# The four kinds of handler, by (request streaming, response streaming).
_KINDS = {
    (False, False): _Kind("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): _Kind("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): _Kind("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): _Kind("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _kind(handler: grpc.RpcMethodHandler) -> _Kind:
    return _KINDS[bool(handler.request_streaming), bool(handler.response_streaming)]


UNDECODABLE = object()  # what a request that does not parse deserializes to


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure is the client's: refused in the handler
            return UNDECODABLE

    return deserialize


async def _admitted(context: grpc.aio.ServicerContext) -> None:
    """Tell a client that streams its requests that its call was admitted (the response headers), so that it
    can wait for the verdict before it writes: a message written while the server refuses the call can turn
    the refusal into gRPC core's INTERNAL "Internal error from Core" on the client (a grpc.aio race)."""
    await context.send_initial_metadata(())


async def _refuse(context: grpc.aio.ServicerContext, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {method}")


async def _parsed(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str, messages: Messages
) -> AsyncIterator[Any]:
    async for request in requests:
        messages.received += 1
        if request is UNDECODABLE:
            await _refuse(context, method)
        yield request


async def _one(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> Any:
    async for request in requests:
        return request
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no request message for {method}")


def _reading_after_entry(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A unary-request handler served as a request-streaming one, which reads its one request itself.

    grpc reads a unary request whole (up to the message size limit) before its handler, and so `enter`, runs;
    a request-streaming handler runs before any message is read. Served this way, `enter` decides from the
    call's headers alone, and a call it refuses is answered at once, its request never read."""
    inner = getattr(handler, _kind(handler).behavior)

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await inner(await _one(requests, context, method), context)

    async def writing(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await inner(await _one(requests, context, method), context)

    async def streaming(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for response in inner(await _one(requests, context, method), context):
            yield response

    return _KINDS[True, bool(handler.response_streaming)].factory(
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
    handler: grpc.RpcMethodHandler,
    enter: Enter,
    after: After,
    method: str = "this method",
    *,
    headers_first: bool = False,
) -> grpc.RpcMethodHandler:
    """`handler` with `enter`/`after` around each call (its `pending`, awaited first), and unparsable requests
    refused after that (a caller refused by `enter` learns nothing about its request).

    With `headers_first`, `enter` runs before a unary request is read too (see `_reading_after_entry`), as it
    always does for request streams."""
    unary_call = not handler.request_streaming and not handler.response_streaming  # metrics: no counts
    if headers_first and not handler.request_streaming:
        handler = _reading_after_entry(handler, method)
    kind = _kind(handler)
    behavior = getattr(handler, kind.behavior)
    deserializer = _tolerant(handler.request_deserializer)
    streaming_requests = handler.request_streaming

    async def checked(request: Any, context: grpc.aio.ServicerContext, messages: Messages | None) -> Any:
        if streaming_requests:
            assert messages is not None
            return _parsed(request, context, method, messages)
        if request is UNDECODABLE:
            await _refuse(context, method)
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
                await entered.pending
            if streaming_requests:
                await _admitted(context)
            return await behavior(
                (request if ready(request) else await checked(request, context, messages)), context
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            if messages is not None and error is None:
                messages.sent = 1
            after(entered, context, error, None if unary_call else messages)

    async def writing(request: Any, context: grpc.aio.ServicerContext) -> None:
        entered = enter(context)
        messages = Messages(0 if streaming_requests else 1)  # what it writes is not seen here
        error: BaseException | None = None
        try:
            if entered.pending is not None:
                await entered.pending
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
                await entered.pending
            if streaming_requests:
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


Made = TypeVar("Made")


class HandlerCache(Generic[Made]):
    """What is made from a method's handler (its wrapped form), made once per method instead of once per
    call (a generic handler is asked for the method's handler on every call).

    A service's method handler is the same object on every call, so what is made from it is kept beside it
    and reused while the server returns that same object. Bounded, because method names come from
    clients (unknown ones never get here: they have no handler).
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, Made]] = {}
        self._limit = limit

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        make: Callable[[str, grpc.RpcMethodHandler], Made],
    ) -> Made:
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = make(method, handler)
        if len(self._wrapped) < self._limit or method in self._wrapped:
            self._wrapped[method] = (handler, wrapped)
        return wrapped
