"""ServerSpans (through ServerChain): the spans of the OpenTelemetry grpc instrumentation (names, attributes,
status by code, streams ended when they finish), nothing recorded for unsampled calls, and their trace context
still propagated downstream."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh import propagation, tracing
from mesh.server import AsyncioModel, ServerChain, Threads, ThreadsModel
from mesh.testing import NO_REUSEPORT, Loopback, start_loopback
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.ping.servicer import PingServicer
from services.routeguide.features import builtin_database
from services.routeguide.servicer import RouteGuideServicer

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def provider(sampler: Sampler) -> tuple[TracerProvider, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    made = TracerProvider(sampler=sampler)
    made.add_span_processor(SimpleSpanProcessor(spans))
    return made, spans


@pytest.fixture(autouse=True)
def tracecontext() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    yield
    propagate.set_global_textmap(previous)


async def serve(traced: TracerProvider, servicer: object, add: Callable[[Any, Any], object]) -> Loopback:
    """`servicer` behind the chain, on its model's server (PingServicer: threads; RouteGuide: grpc.aio)."""
    model = ThreadsModel if isinstance(servicer, PingServicer) else AsyncioModel
    return await start_loopback(functools.partial(add, servicer), chain=ServerChain(traced), model=model)


def relaying(stub: object, name: str) -> PingServicer:
    return PingServicer(stub, name, Threads(asyncio.get_running_loop()))  # type: ignore[arg-type]


def ping(port: int) -> tuple[grpc.aio.Channel, ping_pb2_grpc.PingServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT)
    return channel, ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


def server_spans(exporter: InMemorySpanExporter) -> Sequence[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


async def test_a_sampled_call_has_the_instrumentations_span() -> None:
    traced, spans = provider(ALWAYS_ON)
    server = await serve(traced, PingServicer(), ping_pb2_grpc.add_PingServiceServicer_to_server)
    channel, stub = ping(server.port)
    for _ in range(2):  # the second call takes the cached, already wrapped handler
        await stub.Send(ping_pb2.Request(message="x"), timeout=5)
    await channel.close()
    await server.stop()
    found = server_spans(spans)
    assert len(found) == 2
    span = found[1]
    assert span.name == "/ping.PingService/Send" and span.parent is None
    assert span.attributes is not None
    assert dict(span.attributes) | {"rpc.user_agent": "", "net.peer.port": ""} == {
        "rpc.system": "grpc",
        "rpc.service": "ping.PingService",
        "rpc.method": "Send",
        "rpc.grpc.status_code": 0,
        "rpc.user_agent": "",
        "net.peer.ip": "127.0.0.1",
        "net.peer.port": "",
        "net.peer.name": "localhost",
    }
    assert span.status.status_code == StatusCode.UNSET


async def test_status_codes_the_caller_sees_are_recorded() -> None:
    traced, spans = provider(ALWAYS_ON)
    # No upstream: FAILED_PRECONDITION (the caller's fault). An unreachable upstream: UNAVAILABLE (a fault).
    closed = grpc.aio.insecure_channel("127.0.0.1:1", options=NO_REUSEPORT)
    for servicer in (PingServicer(), relaying(ping_pb2_grpc.PingServiceStub(closed), "nowhere")):
        server = await serve(traced, servicer, ping_pb2_grpc.add_PingServiceServicer_to_server)
        channel, stub = ping(server.port)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SendUpstream(ping_pb2.Request(message="x"), timeout=5)
        await channel.close()
        await server.stop()
    await closed.close()
    precondition, unavailable = server_spans(spans)
    assert precondition.attributes is not None and unavailable.attributes is not None
    assert precondition.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert precondition.status.status_code == StatusCode.UNSET
    assert unavailable.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert unavailable.status.status_code == StatusCode.ERROR
    assert "nowhere" in (unavailable.status.description or "")


@pytest.mark.parametrize(
    "more",
    [
        (),  # Cloud Run's case: a lone traceparent, read without the propagator chain
        (("tracestate", "vendor=opaque"),),  # read by the propagator, the trace state carried on
    ],
)
async def test_unsampled_calls_record_nothing_but_carry_the_trace_downstream(
    more: tuple[tuple[str, str], ...],
) -> None:
    relay_traced, relay_spans = provider(ParentBased(ALWAYS_ON))
    upstream_traced, upstream_spans = provider(ALWAYS_ON)  # records whatever arrives, to show what arrived
    upstream = await serve(upstream_traced, PingServicer(), ping_pb2_grpc.add_PingServiceServicer_to_server)
    out = grpc.aio.insecure_channel(
        upstream.address,
        options=NO_REUSEPORT,
        interceptors=tracing.client_interceptors(relay_traced),
    )
    relay = await serve(
        relay_traced,
        relaying(ping_pb2_grpc.PingServiceStub(out), "up"),
        ping_pb2_grpc.add_PingServiceServicer_to_server,
    )
    channel, stub = ping(relay.port)
    unsampled = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-00"), *more)
    await stub.SendUpstream(ping_pb2.Request(message="x"), metadata=unsampled, timeout=5)
    for closing in (channel, out):
        await closing.close()
    for server in (relay, upstream):
        await server.stop()
    assert relay_spans.get_finished_spans() == ()
    (arrived,) = server_spans(upstream_spans)
    assert arrived.context.trace_id == int(TRACE_ID, 16)
    assert arrived.parent is not None and arrived.parent.is_remote and not arrived.parent.trace_flags.sampled
    assert arrived.parent.span_id != 0x00F067AA0BA902B7  # the relay's own (unrecorded) span in between
    assert dict(arrived.parent.trace_state) == dict(more and {"vendor": "opaque"})


async def test_a_stream_is_one_span_ended_when_the_stream_ends() -> None:
    traced, spans = provider(ALWAYS_ON)
    database = builtin_database()
    server = await serve(
        traced, RouteGuideServicer(database), route_guide_pb2_grpc.add_RouteGuideServicer_to_server
    )
    channel = server.channel()
    stub = route_guide_pb2_grpc.RouteGuideStub(channel)
    world = route_guide_pb2.Rectangle(
        lo=route_guide_pb2.Point(latitude=-900000000, longitude=-1800000000),
        hi=route_guide_pb2.Point(latitude=900000000, longitude=1800000000),
    )
    features = [f async for f in stub.ListFeatures(world, timeout=5)]
    await channel.close()
    await server.stop()
    assert len(features) == len(database.features)
    (span,) = server_spans(spans)
    assert span.name == "/routeguide.RouteGuide/ListFeatures"
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 0


def test_trace_formats_are_read_from_the_first_found_and_all_written() -> None:
    both = propagation.propagator_from_env({"OTEL_PROPAGATORS": "tracecontext,gcp_trace,baggage"})
    w3c = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    cloud = {"x-cloud-trace-context": "0af7651916cd43dd8448eb211c80319d/12345;o=1"}
    reads = [trace.get_current_span(both.extract(c)).get_span_context() for c in (w3c | cloud, cloud, {})]
    assert (reads[0].trace_id, reads[0].span_id) == (int(TRACE_ID, 16), 0x00F067AA0BA902B7)
    assert (reads[1].trace_id, reads[1].span_id) == (0x0AF7651916CD43DD8448EB211C80319D, 12345)
    assert not reads[2].is_valid
    written: dict[str, str] = {}
    both.inject(written, context=both.extract(w3c | {"baggage": "k=v"}))
    assert written["traceparent"].split("-")[1] == TRACE_ID
    assert written["x-cloud-trace-context"].startswith(TRACE_ID + "/")
    assert written["baggage"] == "k=v"


@pytest.mark.parametrize(
    ("configured", "decides"),
    [
        ("tracecontext", True),
        ("tracecontext,baggage", True),  # a baggage header takes the propagator's path
        ("tracecontext,gcp_trace", True),  # the first format found wins, and a valid traceparent is first
        ("gcp_trace,tracecontext", False),
        ("gcp_trace", False),
        ("none", False),
    ],
)
def test_a_lone_traceparent_decides_only_where_the_propagators_let_it(configured: str, decides: bool) -> None:
    textmap = propagation.propagator_from_env({"OTEL_PROPAGATORS": configured})
    assert propagation.traceparent_decides(textmap) is decides
    assert propagation.traceparent_decides(TraceContextTextMapPropagator())


async def test_a_sampled_outgoing_stream_is_a_client_span_parenting_the_server_span() -> None:
    client_traced, client_spans = provider(ALWAYS_ON)
    server_traced, spans = provider(ALWAYS_ON)
    server = await serve(
        server_traced,
        RouteGuideServicer(builtin_database()),
        route_guide_pb2_grpc.add_RouteGuideServicer_to_server,
    )
    channel = server.channel(interceptors=tracing.client_interceptors(client_traced))
    stub = route_guide_pb2_grpc.RouteGuideStub(channel)
    area = route_guide_pb2.Rectangle(
        lo=route_guide_pb2.Point(latitude=1), hi=route_guide_pb2.Point(latitude=2)
    )
    assert [f async for f in stub.ListFeatures(area, timeout=5)] == []
    await channel.close()
    await server.stop()
    (client,) = client_spans.get_finished_spans()
    (served,) = server_spans(spans)
    assert client.kind == SpanKind.CLIENT and client.name == "/routeguide.RouteGuide/ListFeatures"
    assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == 0
    assert served.parent is not None and served.parent.span_id == client.context.span_id
    assert served.context.trace_id == client.context.trace_id
