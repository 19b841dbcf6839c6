"""The first real RPC of each service image, shared by the contract tests (which check the answers) and the
cold-start benchmark (which times them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import Message

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from tests.images.containers import Container

# gRPC's canonical RouteGuide database, which the image serves built in.
CANONICAL_POINT = route_guide_pb2.Point(latitude=409146138, longitude=-746188906)
CANONICAL_NAME = "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"
# A box around the canonical point, and a short route through it.
SURVEY_AREA = route_guide_pb2.Rectangle(
    lo=route_guide_pb2.Point(latitude=409000000, longitude=-747000000),
    hi=route_guide_pb2.Point(latitude=410000000, longitude=-746000000),
)
SURVEY_ROUTE = [CANONICAL_POINT, route_guide_pb2.Point(latitude=409319800, longitude=-746201391)]


def upstreams(ping: Container, routeguide: Container) -> dict[str, str]:
    """The aggregator's required settings: its downstreams, plaintext and without ID tokens (no metadata
    server here; on Cloud Run the defaults, TLS and tokens, apply)."""
    return {
        "PING_ADDR": ping.address,
        "ROUTEGUIDE_ADDR": routeguide.address,
        "UPSTREAM_INSECURE": "true",
        "UPSTREAM_UNAUTHENTICATED": "true",
    }


async def ping_send(channel: grpc.aio.Channel, timeout: float, wait: bool = False) -> ping_pb2.Response:
    stub = ping_pb2_grpc.PingServiceStub(channel)
    return await stub.Send(ping_pb2.Request(message="from a container"), timeout=timeout, wait_for_ready=wait)


async def get_feature(
    channel: grpc.aio.Channel, timeout: float, wait: bool = False
) -> route_guide_pb2.Feature:
    stub = route_guide_pb2_grpc.RouteGuideStub(channel)
    return await stub.GetFeature(CANONICAL_POINT, timeout=timeout, wait_for_ready=wait)


async def survey(
    channel: grpc.aio.Channel, timeout: float, wait: bool = False
) -> aggregator_pb2.SurveyResponse:
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    request = aggregator_pb2.SurveyRequest(message="survey", area=SURVEY_AREA, route=SURVEY_ROUTE)
    return await stub.Survey(request, timeout=timeout, wait_for_ready=wait)


FIRST_RPC: dict[str, Callable[..., Awaitable[Message]]] = {
    "ping": ping_send,
    "routeguide": get_feature,
    "aggregator": survey,
}
