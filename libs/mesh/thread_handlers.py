"""The handler wrapper of the threads model (grpc.server): the handler is a function or a generator, and every
call runs on a thread of the server's pool (of its quick pool, for a method marked `never_waits`), in a
contextvars.Context of its own that grpc.server makes for the call (threads_test checks it: a thread's context
would otherwise carry one call's caller, span and deadline into the next call)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from mesh import watchdog
from mesh.handler_kinds import (
    KINDS,
    UNDECODABLE,
    After,
    Arrival,
    Enter,
    Messages,
    Threads,
    kind_of,
    no_request,
    not_a_message,
    one_answered,
    tolerant,
    waits,
)
from mesh.quick_pool import QuickPool

_END = object()


def _parsed(
    requests: Iterator[Any], context: grpc.ServicerContext, method: str, messages: Messages, threads: Threads
) -> Iterator[Any]:
    for request in requests:
        messages.received += 1
        if request is UNDECODABLE:
            not_a_message(method).block(context, threads)
        yield request


def _one(requests: Iterator[Any], context: grpc.ServicerContext, method: str, threads: Threads) -> Any:
    for request in requests:
        return request
    no_request(method).block(context, threads)


def _arriving(
    requests: Iterator[Any], arrival: Arrival, context: grpc.ServicerContext, threads: Threads
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
        refused.block(context, threads)
    yield first
    yield from requests


def _reading_after_entry(
    handler: grpc.RpcMethodHandler, method: str, threads: Threads, quick: QuickPool | None
) -> grpc.RpcMethodHandler:
    """A unary-request handler served as a request-streaming one (see mesh.aio_handlers' namesake); on the
    quick pool, its read is marked for the pool (a late request does not hold one of its few threads)."""
    inner = getattr(handler, kind_of(handler).behavior)

    def reading(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return inner(_one(requests, context, method, threads), context)  # a response, or a response stream

    def reading_quickly(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        assert quick is not None
        return inner(quick.read(lambda: _one(requests, context, method, threads), context), context)

    return KINDS[True, bool(handler.response_streaming)].factory(
        reading if quick is None else reading_quickly,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def wrap(
    handler: grpc.RpcMethodHandler, enter: Enter, after: After, method: str, threads: Threads
) -> grpc.RpcMethodHandler:
    """See mesh.handlers.wrap; `enter` always runs before a unary request is read."""
    unary_call = not handler.request_streaming and not handler.response_streaming  # metrics: no counts
    client_streams = handler.request_streaming  # as the service defines it, before `_reading_after_entry`
    quick = None if waits(getattr(handler, kind_of(handler).behavior)) else threads.quick
    # Always here, headers_first or not: grpc.server answers a unary call without its one message with
    # UNIMPLEMENTED "requires exactly one request message"; read here, it is INVALID_ARGUMENT, as it is on
    # grpc.aio (whose server instead waits for the rest of a truncated message until the deadline).
    if not handler.request_streaming:
        handler = _reading_after_entry(handler, method, threads, quick)
    kind = kind_of(handler)
    behavior: Callable[[Any, grpc.ServicerContext], Any] = getattr(handler, kind.behavior)
    deserializer = tolerant(handler.request_deserializer)
    streaming_requests = handler.request_streaming

    def checked(request: Any, context: grpc.ServicerContext, messages: Messages | None) -> Any:
        if streaming_requests:
            assert messages is not None
            return _parsed(request, context, method, messages, threads)
        if request is UNDECODABLE:
            not_a_message(method).block(context, threads)
        return request

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        entered = enter(context)
        # A client stream's messages are counted; a unary call's are not (one each way).
        messages = Messages() if streaming_requests else None
        error: BaseException | None = None
        try:
            if entered.pending is not None:
                entered.pending.block(context, threads)
            if entered.arrival is not None:
                request = _arriving(request, entered.arrival, context, threads)
            if client_streams:
                context.send_initial_metadata(())  # as mesh.aio_handlers._admitted says
            return behavior(checked(request, context, messages), context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            one_answered(after, entered, context, error, None if unary_call else messages)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        entered = enter(context)
        messages = Messages(0 if streaming_requests else 1)
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
        try:
            if entered.pending is not None:
                entered.pending.block(context, threads)
            if entered.arrival is not None:
                request = _arriving(request, entered.arrival, context, threads)
            if client_streams:
                context.send_initial_metadata(())
            for response in behavior(checked(request, context, messages), context):
                messages.sent += 1
                yield response
        except BaseException as exc:
            end(exc)
            raise
        end(None)

    served: Any = streaming if handler.response_streaming else unary
    if quick is not None:
        served.experimental_thread_pool = quick  # grpc.server's pool for this method
    return kind.factory(
        served,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
