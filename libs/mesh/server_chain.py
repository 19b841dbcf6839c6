"""The mesh's server-side work on every call: the call's span, its caller's identity, its deadline and its
metrics.

Tracing (mesh.server_spans), ID-token verification (mesh.identity), deadline recording (mesh.deadlines) and
the call's duration and messages (mesh.metrics) run in one wrapper around each method handler, made once,
when the service is added to the server: `ServerChain(...).wrapping(server)` is the server to add services
to, for either serving model (a grpc.aio.server, or a grpc.server: mesh.handler_kinds). Not an interceptor,
which sees only the method and metadata: in the wrapper the token is checked inside the call's context, and
a token seen before costs no coroutine.
Order inside a call, outermost first: metrics, deadline, identity, span, the request's parse check, the
handler; with verification on, a unary request is read after identity (mesh.handlers, `headers_first`), and
a call that takes no token waits a bounded time for it before it takes a slot (mesh.exempt_gate). The span
starts once the caller is admitted, so a refused call records none; a new token's span is dated from the
call's entry and covers its verification.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from opentelemetry import metrics, trace

from mesh import deadlines, handlers, identity
from mesh.drain import Drain
from mesh.exempt_gate import EXEMPT_CONCURRENCY, EXEMPT_READ_SECONDS, Arrival, Gate
from mesh.handler_kinds import Messages, Pending, Refusal, Threads
from mesh.identity import EXEMPT_METHODS, TokenVerifier
from mesh.metrics import RpcMetrics
from mesh.quick_pool import QuickPool
from mesh.server_spans import UNTRACED_SERVICES, OpenSpan, ServerSpans, Start, end_span, outcome


class _Entered(NamedTuple):
    """What a call's entry leaves for its end (mesh.handler_kinds.Entered)."""

    started: float  # perf_counter at entry
    # _SpanOnAdmission: a new token's call, whose span opens (if at all) once the call is admitted
    span: OpenSpan | _SpanOnAdmission | None
    deadline: Any  # what deadlines.forget takes
    arrival: Arrival | None  # an exempt call's slot of the exempt gate, taken once its request has arrived
    pending: Pending | None  # what to settle before the handler: the caller's verification or refusal


class _SpanOnAdmission:
    """A new token's verification (what the call settles before its handler), then, if it admits the call, the
    call's span, dated from the call's entry so that it covers the verification as it did when it was opened
    there. A call the verification refuses records no span."""

    __slots__ = ("_verification", "_start", "_metadata", "_started_ns", "opened")

    def __init__(self, verification: Pending, start: Start, metadata: Any) -> None:
        self._verification = verification
        self._start = start
        self._metadata = metadata
        self._started_ns = time.time_ns()
        self.opened: OpenSpan | None = None

    async def wait(self, context: grpc.aio.ServicerContext) -> None:
        await self._verification.wait(context)  # a refusal ends the call here (the abort raises)
        self.opened = self._start(context, self._metadata, self._started_ns)

    def block(self, context: grpc.ServicerContext, threads: Threads) -> None:
        self._verification.block(context, threads)
        self.opened = self._start(context, self._metadata, self._started_ns)


class ServerChain:
    """Spans (when `provider` is given), token verification (when `verifier` is), the incoming deadline, and
    metrics (when `meters` is given).

    With a verifier, every call is admitted from its headers before any request message is read; the exempt
    methods (health Check) take no token, and at most `exempt_concurrency` of them run at once, each once its
    request has arrived (within EXEMPT_READ_SECONDS); every other method wants a token."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        verifier: TokenVerifier | None = None,
        *,
        meters: metrics.MeterProvider | None = None,
        exempt_methods: Iterable[str] = EXEMPT_METHODS,
        exempt_concurrency: int = EXEMPT_CONCURRENCY,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
        drain: Drain | None = None,
    ) -> None:
        self._spans = None if provider is None else ServerSpans(provider, untraced_services)
        self._metrics = None if meters is None else RpcMetrics(meters, "server")
        self._verifier = verifier
        self._exempt = frozenset(exempt_methods)
        self._exempt_gate = Gate(exempt_concurrency)
        self.drain = drain  # counts the calls in flight, and refuses new ones at shutdown (mesh.drain)

    def wrapping(self, server: Any, quick: QuickPool | None = None) -> Any:
        """`server` (a grpc.aio.Server, or a grpc.Server: the threads model, which must be wrapped on the
        process's event loop, its `never_waits` methods run on `quick` when given), with every handler added
        through it wrapped by this chain."""
        if isinstance(server, grpc.aio.Server):
            return _WrappingServer(server, self)
        return _WrappingThreadsServer(server, self, Threads(asyncio.get_running_loop(), quick))

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler, threads: Threads | None = None
    ) -> grpc.RpcMethodHandler:
        """`handler` of `method` ("/package.Service/Method") run inside the chain, for a grpc.aio server or,
        given `threads`, a grpc.server."""
        start = None if self._spans is None else self._spans.starter(method)
        measured = None if self._metrics is None else self._metrics.method(method)
        admit = gate = None
        if self._verifier is not None:
            if method in self._exempt:
                gate = self._exempt_gate
            else:
                admit = identity.admitter(self._verifier, method)

        def enter(context: Any) -> _Entered:
            # The metadata is read once for the span and the token: gRPC converts it anew on every read.
            metadata = (context.invocation_metadata() or ()) if start or admit else ()
            started = time.perf_counter()
            deadline = deadlines.record(context)
            if gate is not None:
                # Not refused from its headers (it takes no token): its slot is taken once its request arrives.
                span = None if start is None else start(context, metadata, None)
                return _Entered(started, span, deadline, Arrival(gate, EXEMPT_READ_SECONDS), None)
            pending = None if admit is None else admit(context, metadata)
            # The span starts once the call is admitted: a refused call records none, whatever its caller's
            # trace context asks for (a sampled `traceparent` would otherwise make every refusal an export).
            if start is None or type(pending) is Refusal:
                return _Entered(started, None, deadline, None, pending)
            if pending is None:  # admitted at once (no verification, or a token seen before): the common path
                return _Entered(started, start(context, metadata, None), deadline, None, None)
            admitting = _SpanOnAdmission(pending, start, metadata)  # a new token, verified before the handler
            return _Entered(started, admitting, deadline, None, admitting)

        def after(
            entered: _Entered, context: Any, error: BaseException | None, messages: Messages | None
        ) -> None:
            if entered.arrival is not None:
                entered.arrival.leave()
            deadlines.forget(entered.deadline)
            span = entered.span
            if isinstance(span, _SpanOnAdmission):
                span = span.opened
            if span is not None:
                end_span(span, context, error)
            if measured is not None:
                measured.record(entered.started, outcome(context, error), messages)

        # Outermost: a call refused at shutdown costs nothing more.
        entering, leaving = (enter, after) if self.drain is None else self.drain.around(enter, after)
        # With verification on, every call is admitted from its headers alone, before its request is read: a
        # call refused (no token, a bad one, the exempt gate full) is answered at once and its request never
        # taken in, whatever its kind.
        return handlers.wrap(
            handler, entering, leaving, method, headers_first=self._verifier is not None, threads=threads
        )


class _Adding:
    """What a service's generated `add_*Servicer_to_server` calls, the handlers it adds (generic and registered)
    wrapped by the chain on the way in (each made once per method) and handed to the server."""

    def __init__(self, server: Any, chain: ServerChain, threads: Threads | None = None) -> None:
        self._server, self._chain, self._threads = server, chain, threads
        self._wrapped: handlers.HandlerCache[grpc.RpcMethodHandler] = handlers.HandlerCache()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrapped.get(method, handler, self._make)

    def _make(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._chain.wrap(method, handler, self._threads)

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


class _WrappingServer(_Adding, grpc.aio.Server):  # type: ignore[misc]
    """A grpc.aio server with the chain around its handlers. A real grpc.aio.Server subclass, because
    libraries pick their aio flavour by isinstance (reflection does)."""

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self._server.wait_for_termination(timeout))


class _WrappingThreadsServer(_Adding, grpc.Server):  # type: ignore[misc]
    """A grpc.server with the chain around its handlers (and so, for reflection, not a grpc.aio.Server)."""

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        return self._server.stop(grace)  # type: ignore[no-any-return]

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self._server.wait_for_termination(timeout))


class _Wrapped(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, adding: _Adding) -> None:
        self._inner = inner
        self._adding = adding

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._adding.wrap(handler_call_details.method, handler)
