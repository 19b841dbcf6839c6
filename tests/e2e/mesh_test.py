"""The whole mesh on the local Cloud Run, called as a caller outside Cloud Run calls it (TLS to the front end, by
run.app name): calls succeed with verified ID tokens, one trace covers a request across the four services, and
bad or unwelcome tokens are refused at the first hop."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.v1 import aggregator_pb2
from emulators.identity import SigningKey
from localmesh.demo import CLIENT, WORLD, DemoClient, point
from localmesh.launcher import Mesh
from ping import ping_pb2
from routeguide import route_guide_pb2
from tests.e2e import calls
from tests.e2e.calls import FINE, bearer, describe, features, one, tls_channel

pytestmark = pytest.mark.asyncio(loop_scope="module")

SURVEY = "/aggregator.v1.Aggregator/Survey"
SEND = "/ping.PingService/Send"
LIST_FEATURES = "/routeguide.RouteGuide/ListFeatures"
RECORD_ROUTE = "/routeguide.RouteGuide/RecordRoute"


async def test_relayed_ping_goes_through_both_pings_with_tokens_from_the_metadata_server(
    mesh: Mesh, client: DemoClient
) -> None:
    stub = calls.ping(client.channel("ping"))
    reply = await stub.SendUpstream(ping_pb2.Request(message="hello"), timeout=10)
    assert (reply.pong.index, reply.pong.message) == (1, "hello (relayed)")
    assert reply.pong.received_on.seconds > 0
    # ping got its token for ping-upstream from its own metadata server, through google-auth.
    assert mesh.identity.identity_requests(mesh.account("ping"), mesh.audience("ping-upstream")) >= 1


@pytest.mark.parametrize("service", ["aggregator", "ping", "ping-upstream", "routeguide"])
async def test_every_service_answers_by_its_run_app_name_through_the_front_end(
    mesh: Mesh, client: DemoClient, service: str
) -> None:
    # Health takes no token; the startup probe's service name is the service's own, so the answer is its.
    probe = mesh.plan[service].spec.probe_service if mesh.plan else None
    assert probe and mesh.host(service) == f"{service}-100000000001.europe-west1.run.app"
    async with tls_channel(mesh, client, service) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=probe), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["ping-upstream", "routeguide"])
async def test_the_developer_may_not_call_what_only_the_mesh_calls(
    mesh: Mesh, client: DemoClient, service: str
) -> None:
    # services/invokers.yaml gives outside callers (mesh-client, the developer) ping and the aggregator only.
    assert mesh.developer == "mesh-client@local-mesh.iam.gserviceaccount.com"
    channel = client.channel(service)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if service == "routeguide":
            await calls.routeguide(channel).GetFeature(point(40.9, -74.6), timeout=10)
        else:
            await calls.ping(channel).Send(ping_pb2.Request(message="hi"), timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert mesh.developer in (error.value.details() or "")


async def test_the_front_end_speaks_only_tls(mesh: Mesh) -> None:
    options = [("grpc.so_reuseport", 0), ("grpc.default_authority", f"{mesh.host('aggregator')}:443")]
    async with grpc.aio.insecure_channel(mesh.front, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await calls.aggregator(channel).Survey(aggregator_pb2.SurveyRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_survey_gathers_ping_and_routeguide(mesh: Mesh, client: DemoClient) -> None:
    area = route_guide_pb2.Rectangle(lo=point(-90, -180), hi=point(90, 0))  # the western half
    expected = await features(mesh, client, area)
    route = [f.location for f in expected[:4]]
    assert len(route) == 4, "routeguide's dataset should have features in the western half"
    stub = calls.aggregator(client.channel("aggregator"))
    reply = await stub.Survey(
        aggregator_pb2.SurveyRequest(message="survey", area=area, route=route), timeout=10
    )
    assert [(c.method, c.code) for c in reply.calls] == [(SEND, 0), (LIST_FEATURES, 0), (RECORD_ROUTE, 0)]
    assert reply.pong.message == "survey"
    assert sorted(f.name for f in reply.features) == sorted(f.name for f in expected)
    assert (reply.route_summary.point_count, reply.route_summary.feature_count) == (4, 4)
    assert reply.route_summary.distance > 0


async def test_tour_streams_arrivals_and_returns_earlier_notes(mesh: Mesh, client: DemoClient) -> None:
    first, second = [f for f in await features(mesh, client, WORLD) if f.name][:2]
    note = f"left here by {uuid.uuid4().hex}"  # RouteChat keeps notes for the life of the process

    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=first.location, note=note)
        yield aggregator_pb2.TourStop(location=second.location)
        yield aggregator_pb2.TourStop(location=first.location, note="back again")

    stub = calls.aggregator(client.channel("aggregator"))
    updates = [u async for u in stub.Tour(stops(), timeout=10)]
    arrivals = sorted((u.arrival.stop, u.arrival.feature.name) for u in updates if u.HasField("arrival"))
    assert arrivals == [(0, first.name), (1, second.name), (2, first.name)]
    # Only the first visit's note was there before the second visit to the same place.
    assert [(u.note.location, u.note.message) for u in updates if u.HasField("note")] == [
        (first.location, note)
    ]


async def test_one_trace_links_every_span_of_a_survey_across_the_four_services(
    mesh: Mesh, client: DemoClient
) -> None:
    route = [f.location for f in (await features(mesh, client, WORLD))[:2]]
    stub = calls.aggregator(client.channel("aggregator"))
    started_ns = time.time_ns()
    with client.traced("survey") as trace_id:
        await stub.Survey(aggregator_pb2.SurveyRequest(message="traced", area=WORLD, route=route), timeout=10)
    spans = await mesh.spans.wait_for(
        trace_id, services={CLIENT, "aggregator", "ping", "routeguide"}, timeout=5
    )

    root = one(spans, CLIENT, "internal", "survey")
    call = one(spans, CLIENT, "client", SURVEY)
    served = one(spans, "aggregator", "server", SURVEY)
    assert (root.parent_id, call.parent_id, served.parent_id) == ("", root.span_id, call.span_id)
    for method, callee in ((SEND, "ping"), (LIST_FEATURES, "routeguide"), (RECORD_ROUTE, "routeguide")):
        downstream = one(spans, "aggregator", "client", method)
        answered = one(spans, callee, "server", method)
        assert downstream.parent_id == served.span_id, method
        assert answered.parent_id == downstream.span_id, method
    assert len(spans) == 9, describe(spans)
    assert {s.status for s in spans} <= FINE, describe(spans)
    # No span of this request escaped into another trace: every span the services ended since is in this one.
    later = [s for s in mesh.spans.all() if s.start_ns >= started_ns and s.service != CLIENT]
    assert {s.trace_id for s in later} == {trace_id}, describe(later)


def _forged(mesh: Mesh, audience: str) -> str:
    # Claims the emulator's key id but is signed with another key.
    return mesh.identity.mint(
        mesh.developer, audience, key=SigningKey.generate(), header={"kid": mesh.identity.signing_key.kid}
    )


def _expired(mesh: Mesh, audience: str) -> str:
    now = int(time.time())
    return mesh.identity.mint(mesh.developer, audience, iat=now - 7200, exp=now - 3600)


def _for_another_service(mesh: Mesh, audience: str) -> str:
    return mesh.identity.mint(mesh.developer, mesh.audience("routeguide"))


BAD_TOKENS = {
    "forged": (_forged, "invalid token signature"),
    "expired": (_expired, "token expired"),
    "another audience": (_for_another_service, "audience mismatch"),
}


async def _first_hop(
    mesh: Mesh, client: DemoClient, service: str, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.aio.AioRpcError, str]:
    """Calls `service` (which would call further) with `metadata`; returns the error and the trace id."""
    async with tls_channel(mesh, client, service) as channel:
        with client.traced(f"call {service}") as trace_id, pytest.raises(grpc.aio.AioRpcError) as error:
            if service == "aggregator":
                survey = aggregator_pb2.SurveyRequest(message="hi", area=WORLD)
                await calls.aggregator(channel).Survey(survey, metadata=metadata, timeout=10)
            else:
                relay = ping_pb2.Request(message="hi")
                await calls.ping(channel).SendUpstream(relay, metadata=metadata, timeout=10)
    return error.value, trace_id


async def _admitted(client: DemoClient, service: str) -> None:
    """One call to `service` that it admits: the developer's, with a valid token."""
    if service == "aggregator":
        survey = aggregator_pb2.SurveyRequest(message="admitted", area=WORLD)
        await calls.aggregator(client.channel(service)).Survey(survey, timeout=10)
    else:
        await calls.ping(client.channel(service)).Send(ping_pb2.Request(message="admitted"), timeout=10)


async def _assert_stopped_at_first_hop(
    mesh: Mesh, client: DemoClient, service: str, trace_id: str, code: grpc.StatusCode
) -> None:
    """The caller's span records the refusal, and the refused call records no span of its own anywhere, whatever
    the caller's trace context asked for (mesh.server.ServerChain: the span starts once a call is admitted).
    """
    spans = await mesh.spans.wait_for(trace_id, services={CLIENT}, timeout=5)
    assert [s.status for s in spans if s.kind == "client"] == [code.name], describe(spans)
    # A service exports its spans in the order they end: once an admitted call's span that ended later is here,
    # a span of the refused call would be here too.
    with client.traced("admitted") as later:
        await _admitted(client, service)
    await mesh.spans.wait_for(later, services={CLIENT, service}, timeout=5)
    refused = mesh.spans.trace(trace_id)
    assert {s.service for s in refused} == {CLIENT}, describe(refused)


@pytest.mark.parametrize("service", ["aggregator", "ping"])
async def test_a_call_without_a_token_is_unauthenticated_at_the_first_hop(
    mesh: Mesh, client: DemoClient, service: str
) -> None:
    error, trace_id = await _first_hop(mesh, client, service, ())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in (error.details() or "")
    await _assert_stopped_at_first_hop(mesh, client, service, trace_id, grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
@pytest.mark.parametrize("service", ["aggregator", "ping"])
async def test_a_bad_token_is_unauthenticated_at_the_first_hop(
    mesh: Mesh, client: DemoClient, service: str, kind: str
) -> None:
    make, reason = BAD_TOKENS[kind]
    token = make(mesh, mesh.audience(service))
    error, trace_id = await _first_hop(mesh, client, service, bearer(token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    details = error.details() or ""
    assert reason in details
    assert token not in details and token.split(".")[2] not in details
    await _assert_stopped_at_first_hop(mesh, client, service, trace_id, grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("service", ["aggregator", "ping"])
async def test_a_caller_not_on_the_allow_list_is_permission_denied(
    mesh: Mesh, client: DemoClient, service: str
) -> None:
    # A valid token of the routeguide service's own account: routeguide calls neither of them.
    token = mesh.identity.mint(mesh.account("routeguide"), mesh.audience(service))
    error, trace_id = await _first_hop(mesh, client, service, bearer(token))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert mesh.account("routeguide") in (error.details() or "")
    await _assert_stopped_at_first_hop(mesh, client, service, trace_id, grpc.StatusCode.PERMISSION_DENIED)
