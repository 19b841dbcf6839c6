"""aggregator.v1.Aggregator: our API on top of ping and routeguide."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from mesh import reported
from ping import ping_pb2_grpc
from routeguide import route_guide_pb2_grpc
from services.aggregator.survey import Survey, all_failed, too_long
from services.aggregator.tour import Tour


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServicer):
    def __init__(
        self, ping: ping_pb2_grpc.PingServiceAsyncStub, routes: route_guide_pb2_grpc.RouteGuideAsyncStub
    ) -> None:
        self._survey = Survey(ping, routes)
        self._tour = Tour(routes)

    async def Survey(
        self, request: aggregator_pb2.SurveyRequest, context: grpc.aio.ServicerContext
    ) -> aggregator_pb2.SurveyResponse:
        if refused := too_long(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        response = await self._survey(request)
        if failure := all_failed(response):
            await context.abort(*failure)
        return response

    async def Tour(
        self, request_iterator: AsyncIterator[aggregator_pb2.TourStop], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[aggregator_pb2.TourUpdate]:
        try:
            async for update in self._tour(request_iterator):
                yield update
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), f"routeguide: {reported('routeguide', err)}")
