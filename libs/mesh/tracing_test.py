"""One trace across two real servers (relay ping -> upstream ping), each exporting to its own in-memory
exporter; no spans for health checks; Cloud Run's x-cloud-trace-context joined with OTEL_PROPAGATORS=gcp_trace;
unknown exporter or propagator names stop start-up naming the variable."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mesh import propagation, tracing
from mesh.settings import ConfigError
from mesh.testing import NO_REUSEPORT, running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build as build_ping

SEND = "/ping.PingService/Send"
SEND_UPSTREAM = "/ping.PingService/SendUpstream"


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


def plaintext(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT)


def only(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


async def test_one_trace_spans_the_relay_and_its_upstream() -> None:
    relay_spans, upstream_spans = InMemorySpanExporter(), InMemorySpanExporter()
    async with running("ping-upstream", build_ping, exporters=[upstream_spans]) as upstream:
        env = {"GRPC_PING_HOST": f"127.0.0.1:{upstream.port}", "GRPC_PING_INSECURE": "1"}
        async with running("ping", build_ping, env, exporters=[relay_spans]) as relay:
            async with plaintext(relay.port) as channel:
                await ping(channel).SendUpstream(ping_pb2.Request(message="t"), timeout=5)
    # Leaving `running` flushed each provider.
    relay_server = only(relay_spans.get_finished_spans(), SEND_UPSTREAM, SpanKind.SERVER)
    relay_client = only(relay_spans.get_finished_spans(), SEND, SpanKind.CLIENT)
    upstream_server = only(upstream_spans.get_finished_spans(), SEND, SpanKind.SERVER)
    assert relay_server.parent is None  # the test client sent no trace context: the relay starts the trace
    assert relay_client.context.trace_id == relay_server.context.trace_id
    assert relay_client.parent is not None and relay_client.parent.span_id == relay_server.context.span_id
    assert upstream_server.context.trace_id == relay_server.context.trace_id
    assert upstream_server.parent is not None and upstream_server.parent.is_remote
    assert upstream_server.parent.span_id == relay_client.context.span_id
    assert relay_server.resource.attributes["service.name"] == "ping"
    assert upstream_server.resource.attributes["service.name"] == "ping-upstream"


async def test_health_checks_and_reflection_make_no_spans() -> None:
    spans = InMemorySpanExporter()
    async with running("ping", build_ping, exporters=[spans]) as server:
        async with plaintext(server.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            [_ async for _ in reflect.ServerReflectionInfo(iter([request]), timeout=5)]
            # A real call in the same server does make a span: the exporter is wired.
            await ping(channel).Send(ping_pb2.Request(message="x"), timeout=5)
    assert [s.name for s in spans.get_finished_spans()] == [SEND]


async def served_span(propagators: str, cloud_trace_context: str) -> ReadableSpan:
    """The SERVER span of a Send with Cloud Run's trace header, served with OTEL_PROPAGATORS=`propagators`."""
    spans = InMemorySpanExporter()
    async with running("ping", build_ping, {"OTEL_PROPAGATORS": propagators}, exporters=[spans]) as server:
        async with plaintext(server.port) as channel:
            await ping(channel).Send(
                ping_pb2.Request(message="from cloud run"),
                metadata=(("x-cloud-trace-context", cloud_trace_context),),
                timeout=5,
            )
    return only(spans.get_finished_spans(), SEND, SpanKind.SERVER)


async def test_gcp_trace_propagator_joins_cloud_runs_trace_header() -> None:
    trace_id, parent_span = "0af7651916cd43dd8448eb211c80319c", 12345
    span = await served_span("tracecontext,gcp_trace", f"{trace_id}/{parent_span};o=1")
    assert span.context.trace_id == int(trace_id, 16)
    assert span.parent is not None and span.parent.span_id == parent_span


async def test_without_gcp_trace_the_cloud_trace_header_is_ignored() -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    span = await served_span("tracecontext", f"{trace_id}/1;o=1")
    assert span.context.trace_id != int(trace_id, 16)
    assert span.parent is None


def test_unknown_exporter_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER") as err:
        tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "console,jaegr"}, "ping")
    assert "jaegr" in str(err.value)


def test_unknown_propagator_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="OTEL_PROPAGATORS") as err:
        propagation.propagator_from_env({"OTEL_PROPAGATORS": "tracecontext,b3"})
    assert "b3" in str(err.value)


async def test_running_a_service_with_an_unknown_propagator_fails_to_start() -> None:
    with pytest.raises(ConfigError, match="OTEL_PROPAGATORS"):
        async with running("ping", build_ping, {"OTEL_PROPAGATORS": "xray"}):
            pass


def test_known_names_build() -> None:
    fields = propagation.propagator_from_env({"OTEL_PROPAGATORS": "tracecontext,baggage,gcp_trace"}).fields
    assert {"traceparent", "baggage", "x-cloud-trace-context"} <= set(fields)
    assert propagation.propagator_from_env({"OTEL_PROPAGATORS": "none"}).fields == set()
    provider = tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "svc"}, "ping")
    assert provider.resource.attributes["service.name"] == "svc"
    provider.shutdown()
