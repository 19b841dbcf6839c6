"""The mesh's server-side work on every call: the call's span, its caller's identity, its deadline and its
metrics.

Tracing (mesh.server_spans), ID-token verification (mesh.identity), deadline recording (mesh.deadlines) and
the call's duration and messages (mesh.metrics) run in one wrapper around each method handler, made once, when the service is added to the server:
`ServerChain(...).wrapping(grpc.aio.server(...))` is the server to add services to. Not a grpc.aio
interceptor, which sees only the method and metadata: in the wrapper the token is checked inside the call's
span and task, and a token seen before costs no coroutine (BENCHMARKS.md, items 7 to 9).
Order inside a call, outermost first: metrics, span, deadline, identity, the request's parse check, the
handler.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import metrics, trace

from mesh import deadlines, handlers, identity
from mesh.identity import EXEMPT_SERVICES, TokenVerifier
from mesh.metrics import RpcMetrics
from mesh.server_spans import UNTRACED_SERVICES, ServerSpans, end_span, outcome


class ServerChain:
    """Spans (when `provider` is given), token verification (when `verifier` is), the incoming deadline, and
    metrics (when `meters` is given)."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        verifier: TokenVerifier | None = None,
        *,
        meters: metrics.MeterProvider | None = None,
        exempt_services: Iterable[str] = EXEMPT_SERVICES,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
    ) -> None:
        self._spans = None if provider is None else ServerSpans(provider, untraced_services)
        self._metrics = None if meters is None else RpcMetrics(meters, "server")
        self._verifier = verifier
        self._exempt = frozenset(exempt_services)
        self._wrapped: handlers.HandlerCache[grpc.RpcMethodHandler] = handlers.HandlerCache()

    def wrapping(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """`server`, with every handler added through it wrapped by this chain."""
        return _WrappingServer(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` ("/package.Service/Method") run inside the chain (made once per method)."""
        return self._wrapped.get(method, handler, self._wrap)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        start = None if self._spans is None else self._spans.starter(method)
        measured = None if self._metrics is None else self._metrics.method(method)
        admit = None
        if self._verifier is not None and not identity.exempt(method, self._exempt):
            admit = identity.admitter(self._verifier, method)

        def enter(context: grpc.aio.ServicerContext) -> tuple[Any, Awaitable[None] | None]:
            # The metadata is read once for the span and the token: gRPC converts it anew on every read.
            metadata = (context.invocation_metadata() or ()) if start or admit else ()
            started = time.perf_counter()
            span = None if start is None else start(context, metadata)
            deadline = deadlines.record(context)
            return (started, span, deadline), None if admit is None else admit(context, metadata)

        def after(
            token: Any,
            context: grpc.aio.ServicerContext,
            error: BaseException | None,
            messages: handlers.Messages | None,
        ) -> None:
            started, span, deadline = token
            deadlines.forget(deadline)
            if span is not None:
                opened, attached = span
                end_span(opened, attached, context, error)
            if measured is not None:
                measured.record(started, outcome(context, error), messages)

        return handlers.wrap(handler, enter, after, method)


class _WrappingServer(grpc.aio.Server):  # type: ignore[misc]
    """A grpc.aio server as a service's generated `add_*Servicer_to_server` sees it: the handlers it adds
    (generic and registered) are wrapped by the chain on the way in; the rest is the server's. A real
    grpc.aio.Server subclass, because libraries pick their aio flavour by isinstance (reflection does)."""

    def __init__(self, server: grpc.aio.Server, chain: ServerChain) -> None:
        self._server = server
        self._chain = chain

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Wrapped(h, self._chain) for h in generic_handlers))

    def add_registered_method_handlers(
        self, service: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrap = self._chain.wrap
        self._server.add_registered_method_handlers(
            service, {name: wrap(f"/{service}/{name}", h) for name, h in method_handlers.items()}
        )

    def add_insecure_port(self, address: str) -> int:
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return int(self._server.add_secure_port(address, server_credentials))

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self._server.wait_for_termination(timeout))


class _Wrapped(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, chain: ServerChain) -> None:
        self._inner = inner
        self._chain = chain

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._chain.wrap(handler_call_details.method, handler)
