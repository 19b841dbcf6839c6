from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from mesh import Runtime, Service
from mesh.testing import NO_REUSEPORT, running
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.aggregator.main import build as build_aggregator
from services.aggregator.survey import MAX_ROUTE_POINTS
from services.aggregator.testing import largest_survey
from services.ping.main import build as build_ping
from services.routeguide.features import load_database
from services.routeguide.main import build as build_routeguide
from services.routeguide.servicer import RouteGuideServicer

BERKSHIRE = route_guide_pb2.Point(latitude=409146138, longitude=-746188906)
AREA = route_guide_pb2.Rectangle(
    lo=route_guide_pb2.Point(latitude=400000000, longitude=-750000000),
    hi=route_guide_pb2.Point(latitude=420000000, longitude=-730000000),
)
ROUTE = [BERKSHIRE, route_guide_pb2.Point(latitude=410248224, longitude=-747127767)]


def plain(port: int) -> str:
    return f"127.0.0.1:{port}"


def aggregator_env(ping_port: int, routes_port: int) -> dict[str, str]:
    return {"PING_ADDR": plain(ping_port), "ROUTEGUIDE_ADDR": plain(routes_port), "UPSTREAM_INSECURE": "1"}


def stub(port: int) -> tuple[grpc.aio.Channel, aggregator_pb2_grpc.AggregatorAsyncStub]:
    channel = grpc.aio.insecure_channel(plain(port), options=NO_REUSEPORT)
    return channel, aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[return-value]


def survey_request() -> aggregator_pb2.SurveyRequest:
    return aggregator_pb2.SurveyRequest(message="hello", area=AREA, route=ROUTE)


@contextlib.asynccontextmanager
async def three_services() -> AsyncIterator[aggregator_pb2_grpc.AggregatorAsyncStub]:
    """ping, routeguide and the aggregator calling them, in this process; the aggregator's client."""
    async with (
        running("ping", build_ping) as ping,
        running("routeguide", build_routeguide) as routes,
        running("aggregator", build_aggregator, aggregator_env(ping.port, routes.port)) as aggregator,
    ):
        channel, client = stub(aggregator.port)
        try:
            yield client
        finally:
            await channel.close()


async def test_survey_combines_all_three_downstream_calls() -> None:
    async with three_services() as client:
        reply = await client.Survey(survey_request(), timeout=10)
    assert reply.pong.message == "hello" and reply.pong.index == 1
    assert len(reply.features) == 100  # the canonical area holds every feature of the canonical db (64 named)
    assert len([f for f in reply.features if f.name]) == 64
    assert reply.route_summary.point_count == 2 and reply.route_summary.feature_count == 2
    assert [c.method for c in reply.calls] == [
        "/ping.PingService/Send",
        "/routeguide.RouteGuide/ListFeatures",
        "/routeguide.RouteGuide/RecordRoute",
    ]
    assert all(c.code == 0 and c.latency.ToNanoseconds() > 0 for c in reply.calls)


async def test_survey_with_routeguide_stopped_is_a_partial_result() -> None:
    async with running("routeguide", build_routeguide) as gone:
        stopped = gone.port
    async with (
        running("ping", build_ping) as ping,
        running("aggregator", build_aggregator, aggregator_env(ping.port, stopped)) as aggregator,
    ):
        channel, client = stub(aggregator.port)
        reply = await client.Survey(survey_request(), timeout=10)
        await channel.close()
    assert reply.pong.message == "hello"
    assert not reply.features and not reply.HasField("route_summary")
    assert [c.code for c in reply.calls] == [
        0,
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
    ]
    assert reply.calls[1].message


async def test_survey_with_every_downstream_stopped_fails() -> None:
    async with running("ping", build_ping) as ping, running("routeguide", build_routeguide) as routes:
        ports = (ping.port, routes.port)
    async with running("aggregator", build_aggregator, aggregator_env(*ports)) as aggregator:
        channel, client = stub(aggregator.port)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.Survey(survey_request(), timeout=10)
        await channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "every downstream call failed" in (err.value.details() or "")


async def test_a_route_past_the_cap_is_refused_before_any_downstream_call() -> None:
    # The downstreams are gone: a Survey that called them would fail UNAVAILABLE, not INVALID_ARGUMENT.
    async with running("ping", build_ping) as ping, running("routeguide", build_routeguide) as routes:
        ports = (ping.port, routes.port)
    async with running("aggregator", build_aggregator, aggregator_env(*ports)) as aggregator:
        channel, client = stub(aggregator.port)
        past = aggregator_pb2.SurveyRequest(message="far", route=[BERKSHIRE] * (MAX_ROUTE_POINTS + 1))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.Survey(past, timeout=10)
        # One point more than the largest valid request: past the request size limit.
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await client.Survey(largest_survey(MAX_ROUTE_POINTS + 1), timeout=10)
        await channel.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        f"route has {MAX_ROUTE_POINTS + 1} points; a Survey takes at most {MAX_ROUTE_POINTS} "
        "(survey a longer route in parts)"
    )
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_largest_valid_survey_is_answered_in_full() -> None:
    request = largest_survey()
    async with three_services() as client:
        reply = await client.Survey(request, timeout=30)
    assert [c.code for c in reply.calls] == [0, 0, 0], reply.calls
    assert reply.pong.message == request.message
    assert reply.route_summary.point_count == MAX_ROUTE_POINTS and reply.route_summary.distance > 0


async def test_tour_streams_an_arrival_per_stop_and_earlier_notes() -> None:
    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        for note in ("first visit", "second visit"):
            yield aggregator_pb2.TourStop(location=BERKSHIRE, note=note)

    async with three_services() as client:
        updates = [u async for u in client.Tour(stops(), timeout=10)]
    arrivals = [u.arrival for u in updates if u.HasField("arrival")]
    notes = [u.note.message for u in updates if u.HasField("note")]
    assert [a.stop for a in arrivals] == [0, 1]
    assert arrivals[0].feature.name == "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"
    assert notes == ["first visit"]  # the second stop's note gets the first one back


async def test_cancelling_a_tour_cancels_the_downstream_chat() -> None:
    # Server spans end only when their handler ends: routeguide's RouteChat span finishing proves the
    # aggregator's cancellation reached it.
    spans = InMemorySpanExporter()
    async with (
        running("ping", build_ping) as ping,
        running("routeguide", build_routeguide, exporters=[spans]) as routes,
        running("aggregator", build_aggregator, aggregator_env(ping.port, routes.port)) as aggregator,
    ):
        channel, client = stub(aggregator.port)
        never_ending = asyncio.Event()

        async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
            yield aggregator_pb2.TourStop(location=BERKSHIRE, note="hi")
            await never_ending.wait()

        call = client.Tour(stops())
        first = await call.read()
        assert first.arrival.feature.name.startswith("Berkshire")
        assert not chat_ended(spans)
        call.cancel()
        for _ in range(100):  # up to 5 s
            if chat_ended(spans):
                break
            await asyncio.sleep(0.05)
        await channel.close()
        assert chat_ended(spans)


def chat_ended(spans: InMemorySpanExporter) -> bool:
    return any(s.name == "/routeguide.RouteGuide/RouteChat" for s in spans.get_finished_spans())


class StallingRouteGuide(RouteGuideServicer):
    """The real routeguide, except that a lookup at STALL never answers (until cancelled)."""

    async def GetFeature(self, request: route_guide_pb2.Point, context: Any) -> route_guide_pb2.Feature:
        if request == STALL:
            await asyncio.sleep(30)  # ended by the caller's deadline
        return await super().GetFeature(request, context)


STALL = route_guide_pb2.Point(latitude=1, longitude=1)


def build_stalling(runtime: Runtime) -> Sequence[Service]:
    servicer = StallingRouteGuide(load_database(None))
    return [Service("routeguide.RouteGuide", servicer, route_guide_pb2_grpc.add_RouteGuideServicer_to_server)]


async def test_a_tour_reports_a_stop_whose_lookup_hung_and_goes_on() -> None:
    # No deadline on the tour: the stalled lookup is bounded by DOWNSTREAM_TIMEOUT_SECONDS.
    env = {"DOWNSTREAM_TIMEOUT_SECONDS": "0.5"}
    async with (
        running("ping", build_ping) as ping,
        running("routeguide", build_stalling) as routes,
        running(
            "aggregator", build_aggregator, {**aggregator_env(ping.port, routes.port), **env}
        ) as aggregator,
    ):
        channel, client = stub(aggregator.port)

        async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
            for where in (BERKSHIRE, STALL, BERKSHIRE):
                yield aggregator_pb2.TourStop(location=where)

        updates = [u async for u in client.Tour(stops())]
        await channel.close()
    arrivals = [u.arrival for u in updates if u.HasField("arrival")]
    assert [a.stop for a in arrivals] == [0, 1, 2]
    assert [a.HasField("failure") for a in arrivals] == [False, True, False]
    failed = arrivals[1].failure
    assert (failed.method, failed.code) == (
        "/routeguide.RouteGuide/GetFeature",
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
    )
    assert not arrivals[1].HasField("feature") and arrivals[2].feature.name.startswith("Berkshire")
