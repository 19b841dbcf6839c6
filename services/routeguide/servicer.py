"""RouteGuide for grpc.aio with the canonical semantics, on a validated and indexed feature database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from routeguide import route_guide_pb2_grpc
from routeguide.route_guide_pb2 import Feature, Point, Rectangle, RouteNote, RouteSummary
from services.routeguide.chat import NoteBoard, NoteTooLarge
from services.routeguide.features import FeatureDatabase
from services.routeguide.geo import InvalidCoordinate, check_point, haversine_m
from services.routeguide.index import SpatialIndex

INT32_MAX = 2**31 - 1

Context = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


class RouteGuideServicer(route_guide_pb2_grpc.RouteGuideServicer):
    """Streaming handlers are async generators (not context.write): the mesh's handler wrapper counts what
    they yield for the per-stream message metrics (mesh.server._asyncio), and cannot see what context.write sends.
    """

    def __init__(
        self,
        database: FeatureDatabase,
        notes: NoteBoard[RouteNote] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Messages are built once here and sent as they are: no per-call allocation for stored features.
        self._features = SpatialIndex(
            (
                f.latitude,
                f.longitude,
                Feature(name=f.name, location=Point(latitude=f.latitude, longitude=f.longitude)),
            )
            for f in database.features
        )
        self._notes: NoteBoard[RouteNote] = notes if notes is not None else NoteBoard()
        self._clock = clock
        self._open_streams = 0

    @property
    def open_streams(self) -> int:
        """Streaming calls whose handler has not finished yet."""
        return self._open_streams

    async def GetFeature(self, request: Point, context: Context) -> Feature:
        try:
            check_point(request.latitude, request.longitude)
        except InvalidCoordinate as error:
            await _invalid_argument(context, str(error))
        found = self._features.at(request.latitude, request.longitude)
        return found if found is not None else Feature(name="", location=request)

    async def ListFeatures(self, request: Rectangle, context: Context) -> AsyncIterator[Feature]:
        lo, hi = request.lo, request.hi
        try:
            check_point(lo.latitude, lo.longitude, "lo.")
            check_point(hi.latitude, hi.longitude, "hi.")
        except InvalidCoordinate as error:
            await _invalid_argument(context, str(error))
        self._open_streams += 1
        try:
            # On cancellation the generator is closed at a yield; the index iterator holds nothing to free.
            for feature in self._features.within(lo.latitude, lo.longitude, hi.latitude, hi.longitude):
                yield feature
        finally:
            self._open_streams -= 1

    async def RecordRoute(self, request_iterator: AsyncIterator[Point], context: Context) -> RouteSummary:
        # Running totals only, so a route of any length costs constant memory.
        point_count = feature_count = 0
        distance_m = 0.0
        first_seen = last_seen = 0.0
        previous: Point | None = None
        self._open_streams += 1
        try:
            async for point in request_iterator:
                try:
                    check_point(point.latitude, point.longitude, f"points[{point_count}].")
                except InvalidCoordinate as error:
                    await _invalid_argument(context, str(error))
                last_seen = self._clock()
                if previous is None:
                    first_seen = last_seen
                else:
                    distance_m += haversine_m(
                        previous.latitude, previous.longitude, point.latitude, point.longitude
                    )
                if self._features.at(point.latitude, point.longitude) is not None:
                    feature_count += 1
                point_count += 1
                previous = point
        finally:
            self._open_streams -= 1
        # int32 fields: saturate rather than wrap on absurdly long routes.
        return RouteSummary(
            point_count=min(point_count, INT32_MAX),
            feature_count=min(feature_count, INT32_MAX),
            distance=min(round(distance_m), INT32_MAX),
            elapsed_time=min(int(last_seen - first_seen), INT32_MAX),
        )

    async def RouteChat(
        self, request_iterator: AsyncIterator[RouteNote], context: Context
    ) -> AsyncIterator[RouteNote]:
        self._open_streams += 1
        try:
            number = sent = 0
            async for note in request_iterator:
                where = f"notes[{number}]"
                latitude, longitude = note.location.latitude, note.location.longitude
                try:
                    check_point(latitude, longitude, f"{where}.location.")
                    earlier = self._notes.exchange((latitude, longitude), note, note.ByteSize())
                except InvalidCoordinate as error:
                    await _invalid_argument(context, str(error))
                except NoteTooLarge as error:
                    await _invalid_argument(context, f"{where}: {error}")
                number += 1
                sent += earlier.size
                if sent > self._notes.max_stream_reply_bytes:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{where}: RouteChat sends at most {self._notes.max_stream_reply_bytes} bytes of earlier "
                        "notes on one stream; open another stream",
                    )
                for stored in earlier.notes:
                    yield stored
        finally:
            self._open_streams -= 1


async def _invalid_argument(context: Context, message: str) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    raise AssertionError("abort raises")
