"""Survey: one message, an area and a route, answered by ping and routeguide concurrently.

Each downstream call ends by the incoming deadline less mesh's margin, so a downstream that hangs leaves its
part empty and reported, and the Survey still answers with the rest before its caller's deadline.

The route is streamed on to routeguide one message per point, so its length is capped (MAX_ROUTE_POINTS):
without a cap a 4 MiB Survey of empty Points was about 2 million downstream messages, seconds of CPU in both
services for one call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc

from aggregator.v1 import aggregator_pb2
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.aggregator.downstream import timed

SEND = "/ping.PingService/Send"
LIST_FEATURES = "/routeguide.RouteGuide/ListFeatures"
RECORD_ROUTE = "/routeguide.RouteGuide/RecordRoute"

# The most points a Survey's route may have: a 10 km walk with a point every 10 m, or an hour's drive with a
# fix every 4 s (Google's Roads API snaps at most 100 points per request). Longer tracks are surveyed in parts.
# Each point is one message in each of two services (about 0.15 ms of CPU in each, measured on a loaded
# 2-core machine), so a Survey at the cap costs about a third of a CPU second, well under one (RELIABILITY.md).
MAX_ROUTE_POINTS = 1_000
# The message goes on to ping.Send, whose whole Request (the same field: tag, length, text) is at most 64 KiB
# (services/ping/main.py): a longer one could never be answered.
MAX_MESSAGE_FIELD_BYTES = 64 * 1024
# The largest SurveyRequest within those limits, and so the aggregator's request size limit:
#   a Point at its largest is two int32 fields of tag (1 byte) + varint (10 bytes: a negative int32 is
#   sign-extended to 64 bits): 22 bytes;
#   each route point is field 3: tag (1) + length (1) + 22 = 24 bytes;
#   the area is field 2: tag (1) + length (1) + a Rectangle of two Points, each tag (1) + length (1) + 22:
#   2 + 48 = 50 bytes;
#   the message field is at most MAX_MESSAGE_FIELD_BYTES;
#   so 65,536 + 50 + 24 x 1,000 = 89,586 bytes (87.5 KiB). A TourStop (a Point and a note of at most 4 KiB,
#   routeguide's limit) is far smaller.
_POINT_BYTES = 2 * (1 + 10)
_ROUTE_POINT_BYTES = 1 + 1 + _POINT_BYTES
_AREA_BYTES = 1 + 1 + 2 * (1 + 1 + _POINT_BYTES)
MAX_REQUEST_BYTES = MAX_MESSAGE_FIELD_BYTES + _AREA_BYTES + MAX_ROUTE_POINTS * _ROUTE_POINT_BYTES


def too_long(request: aggregator_pb2.SurveyRequest) -> str | None:
    """Why the request's route is refused (INVALID_ARGUMENT), or None: checked before any downstream call."""
    if len(request.route) <= MAX_ROUTE_POINTS:
        return None
    return (
        f"route has {len(request.route)} points; a Survey takes at most {MAX_ROUTE_POINTS} "
        "(survey a longer route in parts)"
    )


class Survey:
    def __init__(
        self, ping: ping_pb2_grpc.PingServiceAsyncStub, routes: route_guide_pb2_grpc.RouteGuideAsyncStub
    ) -> None:
        self._ping = ping
        self._routes = routes

    async def __call__(self, request: aggregator_pb2.SurveyRequest) -> aggregator_pb2.SurveyResponse:
        async def send() -> ping_pb2.Pong:
            return (await self._ping.Send(ping_pb2.Request(message=request.message))).pong

        async def features() -> list[route_guide_pb2.Feature]:
            return [feature async for feature in self._routes.ListFeatures(request.area)]

        async def record() -> route_guide_pb2.RouteSummary:
            points: Iterator[route_guide_pb2.Point] = iter(request.route)
            return await self._routes.RecordRoute(points)

        pong, found, summary = await asyncio.gather(
            timed(SEND, send), timed(LIST_FEATURES, features), timed(RECORD_ROUTE, record)
        )
        return aggregator_pb2.SurveyResponse(
            pong=pong.result,
            features=found.result or [],
            route_summary=summary.result,
            calls=[pong.call, found.call, summary.call],
        )


def all_failed(response: aggregator_pb2.SurveyResponse) -> tuple[grpc.StatusCode, str] | None:
    """The status for the whole Survey when no downstream call succeeded, else None."""
    if any(call.code == 0 for call in response.calls):
        return None
    codes = {call.code for call in response.calls}
    by_value = {code.value[0]: code for code in grpc.StatusCode}
    # One shared cause keeps its code (e.g. DEADLINE_EXCEEDED); mixed causes mean the backends are unavailable.
    code = by_value[codes.pop()] if len(codes) == 1 else grpc.StatusCode.UNAVAILABLE
    details = "; ".join(_described(c.method, by_value[c.code].name, c.message) for c in response.calls)
    return code, f"every downstream call failed: {details}"


def _described(method: str, code: str, message: str) -> str:
    return f"{method}: {code}" if message in ("", code) else f"{method}: {code} {message}"
