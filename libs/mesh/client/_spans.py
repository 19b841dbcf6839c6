"""Client spans for outgoing gRPC calls, on the OpenTelemetry API, with a cheap path for unsampled traces.

The spans of opentelemetry-instrumentation-grpc's aio client interceptors (name = full method, kind
CLIENT, rpc.* attributes, rpc.grpc.status_code, ERROR status for any code but OK) and the same propagation
(the configured propagators inject into the call's metadata). Inside an unsampled trace, which is nearly
every call on Cloud Run, no span would be recorded: the caller's trace context is injected as it is and no
span is made.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mesh.probes import rpc_attributes
from mesh.propagation import SCHEMA_URL, SCOPE, drops_unsampled_parents


class _Injected(NamedTuple):
    """What `textmap` injected for `context`: the same for as long as both are the same objects (an
    OpenTelemetry context is immutable: a change to it makes a new one)."""

    context: Context
    textmap: TextMapPropagator
    headers: dict[str, str]


class ClientSpans:
    """The CLIENT span of an outgoing call (when its trace is sampled) and the trace headers to send;
    run by ClientChain."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer(SCOPE, schema_url=SCHEMA_URL)
        self._skip_unsampled = drops_unsampled_parents(provider, remote=False)
        self._methods: dict[str | bytes, tuple[str, dict[str, Any]] | None] = {}
        # The headers of the last unsampled context: a call that fans out (a Survey's three calls) sends the
        # same ones on each, so they are made once per incoming call, not once per outgoing one.
        self._last_unsampled: _Injected | None = None

    def _method(self, method: str | bytes) -> tuple[str, dict[str, Any]] | None:
        """(span name, static attributes) per method, or None for probes and tooling; made once per method."""
        found = self._methods.get(method, False)
        if found is not False:
            return found  # type: ignore[return-value]
        attributes = rpc_attributes(method)
        plan = None
        if attributes is not None:
            name = f"/{attributes['rpc.service']}/{attributes['rpc.method']}"
            plan = name, {**attributes, "rpc.grpc.status_code": 0}
        if len(self._methods) < 10_000:
            self._methods[method] = plan
        return plan

    def start(self, method: str | bytes) -> tuple[Span | None, dict[str, str]]:
        """The recording span (or None) and the trace context to send with the call (not to be changed:
        the headers of an unsampled context are shared by its calls)."""
        carrier: dict[str, str] = {}
        plan = self._method(method)
        if plan is None:
            return None, carrier
        if self._skip_unsampled:
            context, textmap = otel_context.get_current(), propagate.get_global_textmap()
            last = self._last_unsampled
            if last is not None and last.context is context and last.textmap is textmap:
                return None, last.headers
            current = trace.get_current_span(context).get_span_context()
            if current.is_valid and not current.trace_flags.sampled:
                textmap.inject(carrier, context=context)  # the unsampled caller's context, as it is
                self._last_unsampled = _Injected(context, textmap, carrier)
                return None, carrier
        started = self._tracer.start_span(plan[0], kind=SpanKind.CLIENT, attributes=plan[1])
        propagate.inject(carrier, context=trace.set_span_in_context(started))
        return (started if started.is_recording() else None), carrier


def _end(span: Span, code: grpc.StatusCode, details: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, details))
    span.end()


async def ended(span: Span, call: Any) -> None:
    """End `span` with the outcome of `call`, which is done."""
    code = await call.code()
    _end(span, code, None if code is grpc.StatusCode.OK else await call.details())
