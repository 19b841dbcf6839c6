"""The three contracts compile to working stubs: a real server on port 0 answers through each generated stub.

These guard the codegen toolchain (local protoc + gRPC plugin) and the wire shapes the services rely on; the
services' behaviour has its own tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc

NO_REUSEPORT = [("grpc.so_reuseport", 0)]
RECEIVED = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_000_000)


class Ping(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message, received_on=RECEIVED))


class Routes(route_guide_pb2_grpc.RouteGuideServicer):
    async def ListFeatures(
        self, request: route_guide_pb2.Rectangle, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[route_guide_pb2.Feature]:
        for name in ("a", "b"):
            yield route_guide_pb2.Feature(name=name, location=request.lo)

    async def RouteChat(
        self, request_iterator: AsyncIterator[route_guide_pb2.RouteNote], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[route_guide_pb2.RouteNote]:
        async for note in request_iterator:
            yield route_guide_pb2.RouteNote(location=note.location, message=note.message.upper())


class Aggregator(aggregator_pb2_grpc.AggregatorServicer):
    async def Survey(
        self, request: aggregator_pb2.SurveyRequest, context: grpc.aio.ServicerContext
    ) -> aggregator_pb2.SurveyResponse:
        return aggregator_pb2.SurveyResponse(
            pong=ping_pb2.Pong(index=1, message=request.message),
            route_summary=route_guide_pb2.RouteSummary(point_count=len(request.route)),
            calls=[
                aggregator_pb2.DownstreamCall(
                    method="/ping.PingService/Send", latency=duration_pb2.Duration(nanos=5)
                )
            ],
        )


def ping_stub(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    # mypy-protobuf types the aio flavour of a stub as a separate, typing-only class.
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(options=NO_REUSEPORT)
    # Partial servicers on purpose: the generated base answers UNIMPLEMENTED for the rest.
    ping_pb2_grpc.add_PingServiceServicer_to_server(Ping(), server)  # type: ignore[abstract]
    route_guide_pb2_grpc.add_RouteGuideServicer_to_server(Routes(), server)  # type: ignore[abstract]
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(Aggregator(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT) as ch:
        yield ch
    await server.stop(None)


async def test_ping_contract_carries_a_timestamp(channel: grpc.aio.Channel) -> None:
    reply = await ping_stub(channel).Send(ping_pb2.Request(message="hi"))
    assert (reply.pong.index, reply.pong.message) == (1, "hi")
    assert reply.pong.received_on == RECEIVED
    assert reply.pong.received_on.ToMilliseconds() == 1_700_000_000_123


async def test_ping_contract_unimplemented_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ping_stub(channel).SendUpstream(ping_pb2.Request(message="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_routeguide_contract_streams_both_ways(channel: grpc.aio.Channel) -> None:
    stub: route_guide_pb2_grpc.RouteGuideAsyncStub = route_guide_pb2_grpc.RouteGuideStub(channel)  # type: ignore
    corner = route_guide_pb2.Point(latitude=1, longitude=2)
    names = [f.name async for f in stub.ListFeatures(route_guide_pb2.Rectangle(lo=corner, hi=corner))]
    assert names == ["a", "b"]

    def notes() -> Iterator[route_guide_pb2.RouteNote]:
        for text in ("x", "y"):
            yield route_guide_pb2.RouteNote(location=corner, message=text)

    echoed = [n.message async for n in stub.RouteChat(notes())]
    assert echoed == ["X", "Y"]


async def test_aggregator_contract_reuses_ping_and_routeguide_messages(channel: grpc.aio.Channel) -> None:
    route = [route_guide_pb2.Point(latitude=i, longitude=i) for i in range(3)]
    stub: aggregator_pb2_grpc.AggregatorAsyncStub = aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore
    reply = await stub.Survey(aggregator_pb2.SurveyRequest(message="m", route=route))
    assert reply.pong.message == "m" and reply.route_summary.point_count == 3
    assert reply.calls[0].method == "/ping.PingService/Send" and reply.calls[0].latency.nanos == 5
    # The aggregator's messages embed the other packages' types, not copies of them.
    fields = reply.DESCRIPTOR.fields_by_name
    assert [fields[f].message_type.full_name for f in ("pong", "route_summary")] == [  # type: ignore[union-attr]
        "ping.Pong",
        "routeguide.RouteSummary",
    ]
