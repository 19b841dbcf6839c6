"""Faults on real processes: SIGTERM with many unary calls in flight (what libs/mesh/shutdown_test.py does not
cover: it holds one stream), and a downstream killed outright in the middle of a Tour and of a big Survey, then
restarted on its port while the aggregator keeps running."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.v1 import aggregator_pb2
from routeguide.route_guide_pb2 import Point, Rectangle
from services.aggregator.survey import MAX_ROUTE_POINTS
from tests.reliability import calls
from tests.reliability.processes import Service, kill_all
from tests.reliability.stack import Stack, start_h2c

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OK, UNAVAILABLE = Code.OK.value[0], Code.UNAVAILABLE.value[0]


def route(points: int, offset: int = 0) -> list[Point]:
    return [Point(latitude=offset + i * 100, longitude=i * 100) for i in range(points)]


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    # No lame duck: the drain itself is under test (libs/mesh/shutdown_test.py has the lame duck's).
    started = await start_h2c({"SHUTDOWN_GRACE_SECONDS": "8", "SHUTDOWN_LAME_DUCK_SECONDS": "0"})
    yield started
    await kill_all(started.all)


async def test_sigterm_with_many_unary_calls_in_flight_drains_them_all_and_exits_0(stack: Stack) -> None:
    aggregator = stack.aggregator
    async with calls.insecure(aggregator.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
        stub = calls.aggregator(channel)
        # Each Survey streams its route on to routeguide point by point: it stays in flight for a while.
        surveys = [
            asyncio.ensure_future(
                stub.Survey(
                    aggregator_pb2.SurveyRequest(message=f"s{n}", route=route(MAX_ROUTE_POINTS, n)),
                    timeout=30,
                )
            )
            for n in range(16)
        ]
        await asyncio.sleep(
            0.2
        )  # the requests are on the wire (a Survey that is not yet would get UNAVAILABLE)
        aggregator.signal(signal.SIGTERM)
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()  # a health watch never ends by itself; the drain would wait for it
        results = await asyncio.gather(*surveys, return_exceptions=True)

        async with calls.insecure(aggregator.address) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await calls.aggregator(fresh).Survey(aggregator_pb2.SurveyRequest(message="late"), timeout=5)
        assert refused.value.code() == Code.UNAVAILABLE

    completed = [r for r in results if isinstance(r, aggregator_pb2.SurveyResponse)]
    refused_in_flight = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(completed) + len(refused_in_flight) == len(surveys)
    assert all(r.code() == Code.UNAVAILABLE for r in refused_in_flight), refused_in_flight
    assert completed, "no Survey was in flight when SIGTERM came"
    for reply in completed:  # drained in full: every downstream call of every in-flight Survey finished
        assert [c.code for c in reply.calls] == [OK, OK, OK], reply.calls
        assert reply.route_summary.point_count == MAX_ROUTE_POINTS
    assert await aggregator.wait(15) == 0
    messages = aggregator.messages()
    assert any("shutting down: draining" in m for m in messages) and messages[-1] == "aggregator stopped"
    # The drain's own count: the Surveys (and the cancelled health Watch) in flight all finished, none cut.
    assert any(re.search(r"drained: \d+ calls in flight, \d+ finished, 0 cut", m) for m in messages), messages


async def test_routeguide_killed_mid_tour_ends_the_tour_with_unavailable_before_its_deadline(
    stack: Stack,
) -> None:
    release = asyncio.Event()

    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=Point(latitude=5, longitude=5), note="here")
        await release.wait()

    async with calls.insecure(stack.aggregator.address) as channel:
        loop = asyncio.get_running_loop()
        tour = calls.aggregator(channel).Tour(stops(), timeout=20)
        first = await asyncio.wait_for(tour.read(), 5)
        assert isinstance(first, aggregator_pb2.TourUpdate) and first.HasField("arrival")
        stack.routeguide.signal(signal.SIGKILL)
        killed_at = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(tour.read(), 15)
        release.set()
    assert ended.value.code() == Code.UNAVAILABLE, ended.value.details()
    assert (ended.value.details() or "").startswith("routeguide: ")
    assert loop.time() - killed_at < 20  # the failure came, not the client's deadline
    assert stack.aggregator.returncode is None


async def test_routeguide_killed_mid_survey_is_reported_then_found_again_after_a_restart(
    stack: Stack,
) -> None:
    routeguide, aggregator = stack.routeguide, stack.aggregator
    pid = aggregator.pid
    async with calls.insecure(aggregator.address) as channel:
        stub = calls.aggregator(channel)
        big = aggregator_pb2.SurveyRequest(message="big", route=route(MAX_ROUTE_POINTS))
        # Frozen first (a route at the cap uploads too fast to kill routeguide in the middle of it by waiting):
        # the Survey's calls are on the wire, unanswered, when it dies.
        routeguide.signal(signal.SIGSTOP)
        survey = asyncio.ensure_future(stub.Survey(big, timeout=30))
        await asyncio.sleep(0.3)
        routeguide.signal(signal.SIGKILL)
        assert await routeguide.wait(10) == -signal.SIGKILL
        reply = await survey
        assert reply.calls[0].code == OK and reply.pong.message == "big"
        # The upload that was cut off, reported. A client stream whose peer dies mid-write is ended by gRPC core
        # with UNAVAILABLE or, when the write races the broken connection, INTERNAL "Internal error from Core".
        assert reply.calls[2].code in (UNAVAILABLE, grpc.StatusCode.INTERNAL.value[0]), reply.calls
        assert not reply.HasField("route_summary")

        restarted = await Service("routeguide", {}).start(port=routeguide.port)
        stack.routeguide = restarted
        area = Rectangle(
            lo=Point(latitude=400_000_000, longitude=-750_000_000),
            hi=Point(latitude=420_000_000, longitude=-730_000_000),
        )
        codes: list[int] = []
        for _ in range(40):  # gRPC reconnects with backoff: bounded, about 10 s at most
            healed = await stub.Survey(
                aggregator_pb2.SurveyRequest(message="again", area=area, route=route(10)), timeout=10
            )
            codes = [c.code for c in healed.calls]
            if codes == [OK, OK, OK]:
                break
            await asyncio.sleep(0.25)
        assert codes == [OK, OK, OK], healed.calls
        assert healed.features and healed.route_summary.point_count == 10
    assert aggregator.pid == pid and aggregator.returncode is None  # the caller was never restarted
