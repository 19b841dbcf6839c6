"""ClientSpans inside an unsampled trace: the caller's context is sent as the propagators write it, made once
for the calls of one incoming call and anew for another context or another propagator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.client._spans import ClientSpans

SEND = "/ping.PingService/Send"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def unsampled(span_id: int) -> Context:
    """The context of a served call whose caller's trace is not sampled (what Cloud Run sends)."""
    parent = SpanContext(TRACE_ID, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    return trace.set_span_in_context(NonRecordingSpan(parent))


@pytest.fixture
def spans() -> Iterator[ClientSpans]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    )
    yield ClientSpans(TracerProvider(sampler=ParentBasedTraceIdRatio(0.01)))
    propagate.set_global_textmap(previous)


def started(spans: ClientSpans, context: Context, method: str = SEND) -> dict[str, str]:
    token = otel_context.attach(context)
    try:
        span, headers = spans.start(method)
    finally:
        otel_context.detach(token)
    assert span is None  # an unsampled trace records nothing
    return dict(headers)


def test_each_call_sends_the_trace_context_of_its_own_caller(spans: ClientSpans) -> None:
    first, second = unsampled(0x00F067AA0BA902B7), unsampled(0x00F067AA0BA902B8)
    assert started(spans, first) == {"traceparent": f"00-{TRACE_ID:032x}-00f067aa0ba902b7-00"}
    assert started(spans, first, "/routeguide.RouteGuide/RecordRoute") == started(spans, first)
    assert started(spans, second) == {"traceparent": f"00-{TRACE_ID:032x}-00f067aa0ba902b8-00"}
    assert started(spans, first)["traceparent"].endswith("-00f067aa0ba902b7-00")


def test_baggage_added_to_the_context_is_sent(spans: ClientSpans) -> None:
    context = unsampled(0x00F067AA0BA902B7)
    assert "baggage" not in started(spans, context)
    assert started(spans, baggage.set_baggage("tenant", "a", context))["baggage"] == "tenant=a"


def test_a_replaced_propagator_writes_the_headers(spans: ClientSpans) -> None:
    context = unsampled(0x00F067AA0BA902B7)
    assert "traceparent" in started(spans, context)
    propagate.set_global_textmap(W3CBaggagePropagator())  # restored by the fixture
    assert started(spans, context) == {}


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Check",
        b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
def test_probes_and_tooling_get_no_span_however_their_name_is_spelled(method: str | bytes) -> None:
    assert ClientSpans(TracerProvider()).start(method) == (None, {})


@pytest.mark.parametrize("method", [SEND, SEND[1:], SEND.encode()])
def test_a_call_is_named_the_same_however_its_method_is_spelled(method: str | bytes) -> None:
    span, headers = ClientSpans(TracerProvider()).start(method)  # sampled: a root span
    assert span is not None and "traceparent" in headers
    span.end()
    assert span.name == SEND  # type: ignore[attr-defined]
    assert span.attributes == {  # type: ignore[attr-defined]
        "rpc.system": "grpc",
        "rpc.service": "ping.PingService",
        "rpc.method": "Send",
        "rpc.grpc.status_code": 0,
    }
