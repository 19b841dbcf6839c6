"""The mesh's server-side work on every call: its deadline, its caller's identity, its span and its metrics,
in one wrapper around each method handler, made once per method when the service is added to the server
(`ServerChain.wrapping(server, model)`), on either serving model (mesh.server._model).

Why a wrapper and not a gRPC server interceptor: cost per call. An interceptor is asked for every call and
must hand back a new handler for it (a closure around the servicer's method, made per call), and on grpc.aio
it is a coroutine per call; here everything that depends only on the method (its span name and attributes,
its metrics' attribute sets, its identity check, whether it is exempt) is made once, and a call whose token
was seen before is admitted with no coroutine at all. The order of the steps inside a call is written once,
in `ServerChain.wrap`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc
from opentelemetry import metrics, trace

from mesh import deadlines
from mesh.metrics import RpcMetrics
from mesh.server import _identity
from mesh.server._calls import Messages, Metadata, Pending, Refusal
from mesh.server._drain import Drain
from mesh.server._exempt_gate import EXEMPT_CONCURRENCY, EXEMPT_READ_SECONDS, Arrival, Gate
from mesh.server._identity import EXEMPT_METHODS, TokenVerifier
from mesh.server._model import ServingModel
from mesh.server._spans import UNTRACED_SERVICES, OpenSpan, ServerSpans, Start, end_span, outcome


class _Entered(NamedTuple):
    """What a call's entry leaves for its end (mesh.server._calls.Entered)."""

    started: float  # perf_counter at entry
    # _SpanOnAdmission: a new token's call, whose span opens (if at all) once the call is admitted
    span: OpenSpan | _SpanOnAdmission | None
    deadline: Any  # what deadlines.forget takes
    arrival: Arrival | None  # an exempt call's slot of the exempt gate, taken once its request has arrived
    pending: (
        Pending | Refusal | None
    )  # what to settle before the handler: the caller's verification or refusal


class _SpanOnAdmission:
    """A new token's verification (what the call settles before its handler: mesh.server._calls.Pending), then,
    if it admits the call, the call's span, dated from the call's entry so that it covers the verification. A
    call the verification refuses records no span."""

    __slots__ = ("_verification", "_start", "_context", "_metadata", "_started_ns", "opened")

    def __init__(self, verification: Pending, start: Start, context: Any, metadata: Metadata) -> None:
        self._verification = verification
        self._start = start
        self._context = context
        self._metadata = metadata
        self._started_ns = time.time_ns()
        self.opened: OpenSpan | None = None

    def check(self) -> Any:
        return self._verification.check()

    def settle(self, checked: Any) -> Refusal | None:
        refused = self._verification.settle(checked)
        if refused is None:
            self.opened = self._start(self._context, self._metadata, self._started_ns)
        return refused


class ServerChain:
    """The incoming deadline, token verification (when `verifier` is given), spans (when `provider` is), and
    metrics (when `meters` is), and the drain's count of calls in flight (when `drain` is).

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
        self.drain = (
            drain  # counts the calls in flight, and refuses new ones at shutdown (mesh.server._drain)
        )

    def wrapping(self, server: Any, model: ServingModel) -> Any:
        """`server` (made by `model`), with every handler added through it wrapped by this chain."""
        return model.adding(server, lambda method, handler: self.wrap(method, handler, model))

    def wrap(self, method: str, handler: grpc.RpcMethodHandler, model: ServingModel) -> grpc.RpcMethodHandler:
        """`handler` of `method` ("/package.Service/Method") run inside the chain, served by `model`.

        Inside a call, in this order (the code below decides it):
          1. the drain (outermost): a call refused at shutdown costs nothing more;
          2. `enter`, from the call's headers alone, before any request message is read when verification is
             on (`headers_first`: a refused call is answered at once, its request never taken in, whatever
             its kind): the clock for metrics, the deadline (mesh.deadlines), then the caller's token
             (mesh.server._identity: a token seen before is admitted at once, a new one is verified before
             the handler, a bad one refused) or, for an exempt method, the exempt gate (its slot taken once its
             request has arrived), then the span (mesh.server._spans), opened once the caller is admitted: a
             refused call records none, a new token's span is dated from the call's entry;
          3. the model finishes what `enter` left pending, the request's parse check (INVALID_ARGUMENT), the
             servicer's method;
          4. `after`: the exempt slot left, the deadline forgotten, the span ended, the call measured."""
        start = None if self._spans is None else self._spans.starter(method)
        measured = None if self._metrics is None else self._metrics.method(method)
        admit = gate = None
        if self._verifier is not None:
            if method in self._exempt:
                gate = self._exempt_gate
            else:
                admit = _identity.admitter(self._verifier, method)

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
            if start is None or isinstance(pending, Refusal):
                return _Entered(started, None, deadline, None, pending)
            if pending is None:  # admitted at once (no verification, or a token seen before): the common path
                return _Entered(started, start(context, metadata, None), deadline, None, None)
            admitting = _SpanOnAdmission(pending, start, context, metadata)  # a new token, verified first
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
            code = None if span is None else end_span(span, context, error)
            if measured is not None:
                measured.record(entered.started, outcome(context, error) if code is None else code, messages)

        entering, leaving = (enter, after) if self.drain is None else self.drain.around(enter, after)
        return model.wrap(handler, entering, leaving, method, headers_first=self._verifier is not None)
