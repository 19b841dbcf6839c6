"""The mesh under faults: deadlines and cancellation reach the downstream calls (a Survey's upload to a frozen
routeguide instance ends by its deadline), routeguide scaled to zero leaves Survey a partial answer, and the
instance that call wakes is found by the aggregator's existing channel (to the front end), as on Cloud Run."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest

from aggregator.v1 import aggregator_pb2
from localmesh.demo import WORLD, DemoClient, point
from localmesh.launcher import Mesh
from routeguide import route_guide_pb2
from services.aggregator.survey import MAX_ROUTE_POINTS
from tests.e2e import calls
from tests.e2e.calls import describe, features, instance_ports, pid_listening, wait_span

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOUR = "/aggregator.v1.Aggregator/Tour"
SURVEY = "/aggregator.v1.Aggregator/Survey"
ROUTE_CHAT = "/routeguide.RouteGuide/RouteChat"
RECORD_ROUTE = "/routeguide.RouteGuide/RecordRoute"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def _held_open(
    location: route_guide_pb2.Point, release: asyncio.Event
) -> AsyncIterator[aggregator_pb2.TourStop]:
    """One stop, then a tour that never ends by itself: the aggregator's RouteChat stays open meanwhile."""

    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=location, note="waiting here")
        await release.wait()

    return stops()


async def _arrival(call: grpc.aio.StreamStreamCall) -> None:
    update = await call.read()
    assert isinstance(update, aggregator_pb2.TourUpdate) and update.HasField("arrival"), update


async def test_a_client_deadline_ends_the_tour_and_its_downstream_chat(
    mesh: Mesh, client: DemoClient
) -> None:
    stub = calls.aggregator(client.channel("aggregator"))
    release = asyncio.Event()
    try:
        with client.traced("tour past its deadline") as trace_id:
            call = stub.Tour(_held_open(point(12.5, 34.5), release), timeout=1.0)
            await _arrival(call)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call.read()  # nothing more comes: the tour is still open when the deadline passes
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # A span is exported when it ends: routeguide's RouteChat, which the client never closed, has ended.
        chat = await wait_span(mesh, trace_id, "routeguide", "server", ROUTE_CHAT, timeout=5)
        assert chat is not None, describe(mesh.spans.trace(trace_id))
        downstream = await wait_span(mesh, trace_id, "aggregator", "client", ROUTE_CHAT, timeout=5)
        assert downstream is not None and chat.parent_id == downstream.span_id
    finally:
        release.set()


async def test_cancelling_a_tour_cancels_its_downstream_chat(mesh: Mesh, client: DemoClient) -> None:
    stub = calls.aggregator(client.channel("aggregator"))
    release = asyncio.Event()
    try:
        with client.traced("tour cancelled") as trace_id:
            call = stub.Tour(_held_open(point(-12.5, 34.5), release), timeout=60)  # the deadline is far away
            await _arrival(call)
            call.cancel()
        chat = await wait_span(mesh, trace_id, "routeguide", "server", ROUTE_CHAT, timeout=5)
        assert chat is not None, describe(mesh.spans.trace(trace_id))
        assert await wait_span(mesh, trace_id, "aggregator", "server", TOUR, timeout=5) is not None
    finally:
        release.set()


async def _survey(client: DemoClient, route: list[route_guide_pb2.Point]) -> aggregator_pb2.SurveyResponse:
    stub = calls.aggregator(client.channel("aggregator"))
    request = aggregator_pb2.SurveyRequest(message="still there?", area=WORLD, route=route)
    return await stub.Survey(request, timeout=10)


async def _instances(mesh: Mesh, service: str, count: int, within: float = 20.0) -> list[int]:
    """The service's instances, once its autoscaler holds `count` of them (bounded in time)."""
    assert mesh.run is not None
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        rows = [r for r in mesh.run.snapshot() if r.service == service and r.percent]
        ports = instance_ports(mesh, service)  # those stopped (out of the front end first) have exited
        if sum(r.instances for r in rows) == count == len(ports):
            return ports
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} did not reach {count} instance(s): {mesh.run.snapshot()}")


async def test_routeguide_scaled_to_zero_leaves_survey_a_partial_answer_and_the_call_wakes_it(
    mesh: Mesh, client: DemoClient
) -> None:
    assert mesh.run is not None
    route = [f.location for f in (await features(mesh, client, WORLD))[:2]]
    aggregator = instance_ports(mesh, "aggregator")
    mesh.run.set_scaling("routeguide", min_instances=0)
    try:
        await _instances(mesh, "routeguide", 0)  # idle: out of the front end, then stopped
        # The local front end cannot hold a call for a revision with no instance (Cloud Run's would, through
        # the cold start): routeguide's calls fail UNAVAILABLE past the aggregator's retries; ping's succeeds.
        partial = await _survey(client, route)
        assert [c.code for c in partial.calls] == [0, UNAVAILABLE, UNAVAILABLE], partial.calls
        assert partial.pong.message == "still there?"
        assert not partial.features and not partial.HasField("route_summary")

        codes: list[int] = []
        for _ in range(40):  # the call woke an instance up; bounded: about 10 s of cold start at most
            healed = await _survey(client, route)
            codes = [c.code for c in healed.calls]
            if codes == [0, 0, 0]:
                break
            await asyncio.sleep(0.25)
        assert codes == [0, 0, 0], healed.calls
        assert healed.features and healed.route_summary.point_count == 2
    finally:
        mesh.run.set_scaling("routeguide", min_instances=1)
    # The aggregator's own instance served throughout: its channel (to the front end) found the new instance.
    assert instance_ports(mesh, "aggregator") == aggregator


async def test_a_survey_deadline_cancels_its_route_upload(mesh: Mesh, client: DemoClient) -> None:
    # A route at the cap uploads in a fraction of a second; to routeguide's one instance frozen (SIGSTOP: the
    # front end's connection to it open, nothing answered) it cannot finish before the deadline.
    route = [point(10 + i * 1e-5, 10) for i in range(MAX_ROUTE_POINTS)]
    request = aggregator_pb2.SurveyRequest(message="long walk", area=WORLD, route=route)
    stub = calls.aggregator(client.channel("aggregator"))
    (port,) = await _instances(mesh, "routeguide", 1)
    routeguide = pid_listening(port)
    with client.traced("survey past its deadline") as trace_id:
        os.kill(routeguide, signal.SIGSTOP)
        try:
            # The upload's deadline is the Survey's less the margin: the Survey answers with the rest in time.
            reply = await stub.Survey(request, timeout=1.0)
        finally:
            os.kill(routeguide, signal.SIGCONT)
    assert reply.pong.message == "long walk" and not reply.HasField("route_summary")
    # DEADLINE_EXCEEDED, or INTERNAL when the deadline lands while a point is being written: grpc.aio then
    # reports "Internal error from Core" before the call's status arrives (a client-side race of grpc.aio).
    timed_out = {grpc.StatusCode.DEADLINE_EXCEEDED.value[0], grpc.StatusCode.INTERNAL.value[0]}
    assert reply.calls[2].code in timed_out, reply.calls
    # The upload was ended by the aggregator, within the Survey (routeguide, frozen, never saw it start: a call
    # cancelled before a server reads it reaches no handler; the Tour test above sees a downstream stream end).
    upload = await wait_span(mesh, trace_id, "aggregator", "client", RECORD_ROUTE, timeout=3)
    survey = await wait_span(mesh, trace_id, "aggregator", "server", SURVEY, timeout=3)
    assert upload is not None and survey is not None, describe(mesh.spans.trace(trace_id))
    assert upload.parent_id == survey.span_id and upload.end_ns <= survey.end_ns
    assert upload.status in ("DEADLINE_EXCEEDED", "INTERNAL"), upload
