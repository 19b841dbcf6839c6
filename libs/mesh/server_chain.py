"""The mesh's server-side work on every call: the call's span, its caller's identity, its deadline and its
metrics.

Tracing (mesh.server_spans), ID-token verification (mesh.identity), deadline recording (mesh.deadlines) and
the call's duration and messages (mesh.metrics) run in one wrapper around each method handler, made once,
when the service is added to the server: `ServerChain(...).wrapping(grpc.aio.server(...))` is the server to
add services to. Not a grpc.aio interceptor, which sees only the method and metadata: in the wrapper the
token is checked inside the call's span and task, and a token seen before costs no coroutine.
Order inside a call, outermost first: metrics, span, deadline, identity, the request's parse check, the
handler; with verification on, a unary request is read after identity (mesh.handlers, `headers_first`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from opentelemetry import metrics, trace

from mesh import deadlines, handlers, identity
from mesh.identity import EXEMPT_METHODS, TokenVerifier
from mesh.metrics import RpcMetrics
from mesh.server_spans import UNTRACED_SERVICES, OpenSpan, ServerSpans, end_span, outcome

# Calls that take no token, in flight at once: enough for Cloud Run's probes (one a second at most), too few
# to take the server's MAX_CONCURRENT_RPCS from the calls it authenticates.
EXEMPT_CONCURRENCY = 16


class _Entered(NamedTuple):
    """What a call's entry leaves for its end (mesh.handlers.Entered)."""

    started: float  # perf_counter at entry
    span: OpenSpan | None
    deadline: Any  # what deadlines.forget takes
    gated: bool  # holds a slot of the exempt gate
    pending: Awaitable[None] | None  # what to await before the handler: the caller's verification or refusal


class _Gate:
    """At most `limit` calls inside at once; the others are refused at once (one event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inside = 0

    def enter(self, context: grpc.aio.ServicerContext) -> Awaitable[None] | None:
        """None when the call is in (then `leave` when it ends), else the refusal to await."""
        if self.inside >= self.limit:
            return context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls without a token in flight (at most {self.limit}); retry later",
            )
        self.inside += 1
        return None

    def leave(self) -> None:
        self.inside -= 1


class ServerChain:
    """Spans (when `provider` is given), token verification (when `verifier` is), the incoming deadline, and
    metrics (when `meters` is given).

    With a verifier, every call is admitted from its headers before any request message is read; the exempt
    methods (health Check) take no token, and at most `exempt_concurrency` of them run at once; every other
    method wants a token."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        verifier: TokenVerifier | None = None,
        *,
        meters: metrics.MeterProvider | None = None,
        exempt_methods: Iterable[str] = EXEMPT_METHODS,
        exempt_concurrency: int = EXEMPT_CONCURRENCY,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
    ) -> None:
        self._spans = None if provider is None else ServerSpans(provider, untraced_services)
        self._metrics = None if meters is None else RpcMetrics(meters, "server")
        self._verifier = verifier
        self._exempt = frozenset(exempt_methods)
        self._exempt_gate = _Gate(exempt_concurrency)
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
        admit = gate = None
        if self._verifier is not None:
            if method in self._exempt:
                gate = self._exempt_gate
            else:
                admit = identity.admitter(self._verifier, method)

        def enter(context: grpc.aio.ServicerContext) -> _Entered:
            # The metadata is read once for the span and the token: gRPC converts it anew on every read.
            metadata = (context.invocation_metadata() or ()) if start or admit else ()
            started = time.perf_counter()
            span = None if start is None else start(context, metadata)
            deadline = deadlines.record(context)
            if gate is not None:
                refused = gate.enter(context)
                return _Entered(started, span, deadline, refused is None, refused)
            return _Entered(
                started, span, deadline, False, None if admit is None else admit(context, metadata)
            )

        def after(
            entered: _Entered,
            context: grpc.aio.ServicerContext,
            error: BaseException | None,
            messages: handlers.Messages | None,
        ) -> None:
            if entered.gated:
                self._exempt_gate.leave()
            deadlines.forget(entered.deadline)
            if entered.span is not None:
                end_span(entered.span, context, error)
            if measured is not None:
                measured.record(entered.started, outcome(context, error), messages)

        # With verification on, every call is admitted from its headers alone, before its request is read: a
        # call refused (no token, a bad one, the exempt gate full) is answered at once and its request never
        # taken in, whatever its kind.
        return handlers.wrap(handler, enter, after, method, headers_first=self._verifier is not None)


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
