"""Wrapping a gRPC method handler of any of the four kinds with code that runs inside the call, on either
serving model (mesh.handler_kinds): grpc.aio (mesh.aio_handlers) or threads (mesh.thread_handlers).

mesh.server_chain wraps each method's handler once, when the service is added: the wrapper runs inside the
call, with its ServicerContext (metadata, deadline) and in the handler's own context (the ContextVars the
handler reads: caller, deadline, span).

The wrapper also answers a request that does not parse with INVALID_ARGUMENT and a fixed message. grpcio's
aio server would answer UNKNOWN "Unexpected <class DecodeError>" and log a traceback per call: a lever for any
client to flood the logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from mesh import aio_handlers, thread_handlers
from mesh.handler_kinds import After, Enter, Threads


def wrap(
    handler: grpc.RpcMethodHandler,
    enter: Enter,
    after: After,
    method: str = "this method",
    *,
    headers_first: bool = False,
    threads: Threads | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with `enter`/`after` around each call (its `pending` settled first), and unparsable requests
    refused after that (a caller refused by `enter` learns nothing about its request); for a grpc.aio server,
    or, given `threads`, for a grpc.server.

    With `headers_first` (always on grpc.server), `enter` runs before a unary request is read too (the handler
    is served as a request-streaming one that reads its one request itself), as it always does for request
    streams."""
    if threads is None:
        return aio_handlers.wrap(handler, enter, after, method, headers_first)
    return thread_handlers.wrap(handler, enter, after, method, threads)


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
