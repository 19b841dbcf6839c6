"""The mesh's server-side work on every call: the call's span, its caller's identity, its deadline and its
metrics.

Tracing (mesh.server_spans), ID-token verification (mesh.identity), deadline recording (mesh.deadlines) and
the call's duration and messages (mesh.metrics) run in one wrapper around each method handler, made once,
when the service is added to the server: `ServerChain(...).wrapping(server)` is the server to add services
to, for either serving model (a grpc.aio.server, or a grpc.server: mesh.handler_kinds). Not an interceptor,
which sees only the method and metadata: in the wrapper the token is checked inside the call's span and
context, and a token seen before costs no coroutine.
Order inside a call, outermost first: metrics, span, deadline, identity, the request's parse check, the
handler; with verification on, a unary request is read after identity (mesh.handlers, `headers_first`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from opentelemetry import metrics, trace

from mesh import deadlines, handlers, identity
from mesh.drain import Drain
from mesh.handler_kinds import Messages, Pending, Refusal, Threads
from mesh.identity import EXEMPT_METHODS, TokenVerifier
from mesh.metrics import RpcMetrics
from mesh.server_spans import UNTRACED_SERVICES, OpenSpan, ServerSpans, end_span, outcome

# Calls that take no token, in flight at once: enough for Cloud Run's probes (one a second at most), too few
# to take the server's MAX_CONCURRENT_RPCS from the calls it authenticates.
EXEMPT_CONCURRENCY = 16


class _Entered(NamedTuple):
    """What a call's entry leaves for its end (mesh.handler_kinds.Entered)."""

    started: float  # perf_counter at entry
    span: OpenSpan | None
    deadline: Any  # what deadlines.forget takes
    gated: bool  # holds a slot of the exempt gate
    pending: Pending | None  # what to settle before the handler: the caller's verification or refusal


class _Gate:
    """At most `limit` calls inside at once; the others are refused at once (from any thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._full = Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many calls without a token in flight (at most {limit}); retry later",
        )

    def enter(self) -> Refusal | None:
        """None when the call is in (then `leave` when it ends), else its refusal."""
        return None if self._slots.acquire(blocking=False) else self._full

    def leave(self) -> None:
        self._slots.release()


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
        drain: Drain | None = None,
    ) -> None:
        self._spans = None if provider is None else ServerSpans(provider, untraced_services)
        self._metrics = None if meters is None else RpcMetrics(meters, "server")
        self._verifier = verifier
        self._exempt = frozenset(exempt_methods)
        self._exempt_gate = _Gate(exempt_concurrency)
        self.drain = drain  # counts the calls in flight, and refuses new ones at shutdown (mesh.drain)

    def wrapping(self, server: Any, quick: concurrent.futures.ThreadPoolExecutor | None = None) -> Any:
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
            span = None if start is None else start(context, metadata)
            deadline = deadlines.record(context)
            if gate is not None:
                refused = gate.enter()
                return _Entered(started, span, deadline, refused is None, refused)
            return _Entered(
                started, span, deadline, False, None if admit is None else admit(context, metadata)
            )

        def after(
            entered: _Entered, context: Any, error: BaseException | None, messages: Messages | None
        ) -> None:
            if entered.gated:
                self._exempt_gate.leave()
            deadlines.forget(entered.deadline)
            if entered.span is not None:
                end_span(entered.span, context, error)
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
