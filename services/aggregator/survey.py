"""Survey: one message, an area and a route, answered by ping and routeguide concurrently.

Each downstream call ends by the incoming deadline less mesh's margin, so a downstream that hangs leaves its
part empty and reported, and the Survey still answers with the rest before its caller's deadline."""

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
    details = "; ".join(f"{c.method}: {by_value[c.code].name} {c.message}".strip() for c in response.calls)
    return code, f"every downstream call failed: {details}"
