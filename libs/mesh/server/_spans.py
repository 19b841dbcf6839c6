"""Server spans for gRPC calls, built on the OpenTelemetry API, with a cheap path for unsampled calls.

The same spans, attributes and propagation as opentelemetry-instrumentation-grpc's aio server interceptor
(name = full method, kind SERVER, rpc.* and net.peer.* attributes, rpc.grpc.status_code, ERROR status for
the server-fault codes), at a fraction of its per-call cost. Where its cost goes: a filter that runs
typing-Protocol isinstance checks on every call, a wrapt proxy around every ServicerContext, the attribute dict (peer address parsing, metadata copied twice) built before the sampler
drops the span, and a new wrapped handler per call. Here the per-method work (filter, names, static
attributes) is done once, and mesh.server._chain runs it inside its one wrapper per method; a call extracts
the caller's context, asks the sampler, and only a recorded span gets the per-call attributes and its
status (read back from the ServicerContext).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from mesh.probes import PROBE_SERVICES, rpc_attributes
from mesh.propagation import SCHEMA_URL, SCOPE, drops_unsampled_parents, traceparent_decides
from mesh.server._calls import Metadata

# Probes and tooling, not requests: no span (the default; tests may trace them).
UNTRACED_SERVICES = PROBE_SERVICES
# The codes that are the server's fault (as the OpenTelemetry instrumentation marks them).
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


_UNSAMPLED = (TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.RANDOM_TRACE_ID))
_NO_TRACE_STATE = TraceState()
# A version-00 traceparent exactly as W3C Trace Context writes it; any other form takes the propagator's path.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_OTHER_TRACE_HEADERS = ("tracestate", "baggage")


def _unsampled_traceparent(metadata: Metadata) -> tuple[int, int] | None:
    """(trace id, trace flags) when the call's trace context is a lone, valid, unsampled traceparent: what
    Cloud Run's front end sends with nearly every request. None for anything else."""
    traceparent = None
    for key, value in metadata:
        if key == "traceparent":
            traceparent = value
        elif key in _OTHER_TRACE_HEADERS:
            return None
    found = _TRACEPARENT_00.fullmatch(traceparent) if isinstance(traceparent, str) else None
    if found is None:
        return None
    trace_id, span_id, flags = int(found[1], 16), int(found[2], 16), int(found[3], 16)
    if flags & TraceFlags.SAMPLED or not trace_id or not span_id:
        return None
    return trace_id, flags


class OpenSpan(NamedTuple):
    """A call's span, open and current: what `end_span` closes."""

    span: Span
    attached: object  # the OpenTelemetry context token that made it current, for detaching


# (context, metadata, start time in ns since the epoch, None: now)
Start = Callable[[grpc.aio.ServicerContext, Metadata, int | None], OpenSpan]


class ServerSpans:
    """One SERVER span per call, child of the caller's propagated context, current while the handler runs:
    `starter(method)` opens it inside the call (made once per method), `end_span` closes it."""

    def __init__(self, provider: trace.TracerProvider, untraced: Iterable[str] = UNTRACED_SERVICES) -> None:
        self._tracer = provider.get_tracer(SCOPE, schema_url=SCHEMA_URL)
        # Cloud Run sends a traceparent on every request, unsampled on nearly all: those spans are made here
        # as the SDK would make them (same trace, new span id, not recorded) without its general machinery.
        self._ids = provider.id_generator if drops_unsampled_parents(provider, remote=True) else None  # type: ignore[attr-defined]
        self._untraced = tuple(untraced)
        self._textmap: object = None
        self._fast = False

    def _traceparent_decides(self) -> bool:
        """Whether the global propagator lets a lone traceparent decide (checked again if it is replaced)."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap, self._fast = textmap, traceparent_decides(textmap)
        return self._fast

    def starter(self, method: str) -> Start | None:
        """What opens a call's span from its context and metadata and makes it current (what `end_span`
        closes); None for an untraced method."""
        named = rpc_attributes(method, self._untraced)
        if named is None:
            return None
        attributes = {**named, "rpc.grpc.status_code": grpc.StatusCode.OK.value[0]}
        tracer, ids = self._tracer, self._ids

        def unsampled_child(trace_id: int, flags: int, state: TraceState, parent: Context) -> OpenSpan:
            assert ids is not None  # only called when the sampler drops such children
            child = SpanContext(
                trace_id, ids.generate_span_id(), False, _UNSAMPLED[1 if flags & 2 else 0], state
            )
            skipped = NonRecordingSpan(child)
            return OpenSpan(skipped, otel_context.attach(trace.set_span_in_context(skipped, parent)))

        def start(
            context: grpc.aio.ServicerContext, metadata: Metadata, started_ns: int | None = None
        ) -> OpenSpan:
            if ids is not None and self._traceparent_decides():
                # The hot path: no carrier, no propagator chain; what extract + the sampler would decide.
                lone = _unsampled_traceparent(metadata)
                if lone is not None:
                    return unsampled_child(lone[0], lone[1], _NO_TRACE_STATE, Context())
            carrier = {key: value for key, value in metadata}
            parent = propagate.extract(carrier)
            if ids is not None:
                caller = trace.get_current_span(parent).get_span_context()
                if caller.is_remote and not caller.trace_flags.sampled and caller.is_valid:
                    return unsampled_child(caller.trace_id, caller.trace_flags, caller.trace_state, parent)
            # The static attributes are copied by the SDK when (and only when) the span records.
            span = tracer.start_span(method, parent, SpanKind.SERVER, attributes, start_time=started_ns)
            if span.is_recording():
                _describe_call(span, context, carrier)
            return OpenSpan(span, otel_context.attach(trace.set_span_in_context(span, parent)))

        return start


def end_span(
    opened: OpenSpan, context: grpc.aio.ServicerContext, error: BaseException | None
) -> grpc.StatusCode | None:
    """Close what a starter opened: status (for a recorded span), the context detached, the span ended; the
    call's outcome when a recorded span had to read it (None for an unrecorded span)."""
    span, attached = opened.span, opened.attached
    code = None
    try:
        if span.is_recording():
            code = _record_outcome(span, context, error)
    finally:
        span.end()
        try:
            # Not otel_context.detach, which logs an error when the call ends outside its own context (an
            # abandoned stream, ended by gRPC's done callback): there is nothing to restore then.
            attached.var.reset(attached)  # type: ignore[attr-defined]
        except ValueError:
            pass
    return code


def _describe_call(span: Span, context: grpc.aio.ServicerContext, metadata: dict[str, Any]) -> None:
    """Per-call attributes, for recorded spans only."""
    if "user-agent" in metadata:
        span.set_attribute("rpc.user_agent", metadata["user-agent"])
    peer = context.peer() or ""
    if peer.startswith("unix:"):
        return
    try:
        ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
    except (IndexError, ValueError):
        return
    ip = unquote(ip)
    span.set_attribute("net.peer.ip", ip)
    span.set_attribute("net.peer.port", port)
    if ip in ("[::1]", "127.0.0.1"):
        span.set_attribute("net.peer.name", "localhost")


def outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a served call ends with: the one set on its context, else what gRPC answers for what the
    handler raised (`error`, None if nothing)."""
    code = _code(context)
    if code is not None and not (code is grpc.StatusCode.OK and error is not None):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, Exception):  # an exception escaping a handler (an abort sets the context's code)
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.CANCELLED  # the task was cancelled: the client went away


def _record_outcome(
    span: Span, context: grpc.aio.ServicerContext, error: BaseException | None
) -> grpc.StatusCode:
    code = outcome(context, error)
    if isinstance(error, Exception) and not _aborted(error, code):
        span.record_exception(error)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, f"{code}:{_details(context)}"))
    return code


def _aborted(error: Exception, code: grpc.StatusCode) -> bool:
    """Whether `error` is how the handler's abort ended the call: grpc.aio's AbortError, or the bare Exception
    grpc.server's abort raises once it has set the call's code."""
    if isinstance(error, grpc.aio.AbortError):
        return True
    return type(error) is Exception and not error.args and code is not grpc.StatusCode.UNKNOWN


def _code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)


def _details(context: grpc.aio.ServicerContext) -> str:
    try:
        details = context.details()
    except (AttributeError, NotImplementedError):
        return ""
    return details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
