"""The serving model: how a service's servicer is written, and so how its calls are served. One contract, two
implementations (mesh.server._asyncio: grpc.aio, every call a task; mesh.server._threads: grpc.server, every
call on a pool thread); nothing else asks which one it has.

A model makes the server and its health servicer, wraps a handler of each of the four call kinds with the
chain's `enter`/`after`, finishes an admission check its call could not finish from the headers (awaited in
the call's task, or run on the process's event loop from the call's thread), and starts, drains and stops the
server.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from mesh.server._calls import After, Enter, Pending, Refusal

# What the chain makes of a method's handler: (full method name "/package.Service/Method", handler) -> handler.
Wrap = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


class ServingModel(abc.ABC):
    """One process's serving model. Made on the process's event loop (the threads model keeps it), once per
    server; `pool_threads`: the threads model's pool size (grpc.aio has no pool)."""

    def __init__(self, pool_threads: int = 8) -> None:
        self.pool_threads = pool_threads

    @abc.abstractmethod
    def server(self, options: Sequence[tuple[str, Any]], max_concurrent_rpcs: int | None = None) -> Any:
        """A new server of this model, not started."""

    @abc.abstractmethod
    def health(self) -> Any:
        """A new health servicer of this model (grpc_health's aio one, or its threads one)."""

    @abc.abstractmethod
    def adding(self, server: Any, wrap: Wrap) -> Any:
        """`server`, with every handler a service adds through it wrapped by `wrap` (once per method)."""

    @abc.abstractmethod
    def wrap(
        self, handler: grpc.RpcMethodHandler, enter: Enter, after: After, method: str, headers_first: bool
    ) -> grpc.RpcMethodHandler:
        """`handler` with `enter`/`after` around each call (what `enter` left pending finished first), and a
        request that does not parse refused with INVALID_ARGUMENT after that (a caller refused by `enter`
        learns nothing about its request; grpcio would answer UNKNOWN and log a traceback per call, a lever
        for any client to flood the logs). With `headers_first`, `enter` runs before a unary request is read
        too (the handler served as a request-streaming one that reads its one request itself), as it always
        does for request streams."""

    @abc.abstractmethod
    def finish(self, pending: Pending | Refusal, context: Any) -> Any:
        """Finish `pending` for the call of `context`, aborting the call if it is (or it makes) a refusal: grpc.aio awaits its
        check in the call's task (this returns the coroutine to await); threads run it on the process's
        event loop and return once it is done."""

    @abc.abstractmethod
    async def start(self, server: Any) -> None: ...

    @abc.abstractmethod
    async def serving(self, health: Any, services: Sequence[str]) -> None:
        """`health` says SERVING for the server ("") and each of `services`."""

    @abc.abstractmethod
    async def not_serving(self, health: Any) -> None:
        """`health` says NOT_SERVING for every service: probes and load balancers stop sending."""

    @abc.abstractmethod
    async def stop(self, server: Any, grace: float | None) -> None:
        """`server` stopped, its calls given `grace` seconds to end (None: none)."""


class Adding:
    """What a service's generated `add_*Servicer_to_server` calls: the handlers it adds (generic and registered)
    wrapped on the way in (each once per method) and handed to the server. Each model subclasses it with its
    server's class too, because libraries pick their aio flavour by isinstance (reflection does)."""

    def __init__(self, server: Any, wrap: Wrap) -> None:
        self._server = server
        self._make = wrap
        self._wrapped: HandlerCache[grpc.RpcMethodHandler] = HandlerCache()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrapped.get(method, handler, self._make)

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Wrapped(h, self) for h in generic_handlers))

    def add_registered_method_handlers(
        self, service: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self.wrap(f"/{service}/{name}", h) for name, h in method_handlers.items()}
        )

    def add_insecure_port(self, address: str) -> int:
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return int(self._server.add_secure_port(address, server_credentials))


class _Wrapped(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, adding: Adding) -> None:
        self._inner = inner
        self._adding = adding

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._adding.wrap(handler_call_details.method, handler)


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
