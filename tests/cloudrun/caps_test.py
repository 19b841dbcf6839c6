"""containerConcurrency as each instance's cap: a one-instance revision at maxScale with every slot held by an
open stream refuses one more call as Cloud Run does (HTTP 429; gRPC callers see UNAVAILABLE), and the streams
it holds go on untouched."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ssl
from collections.abc import Iterator

import grpc
import pytest

from cloudrun.autoscaler import Autoscaler, Scaling
from cloudrun.frontend import FrontEnd, Target
from emulators.dev_ca import DevCerts
from mesh.testing import eventually
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.routeguide import main as routeguide
from tests.cloudrun.instances import CALL_TIMEOUT_S, channel
from tests.cloudrun.launcher import Launcher, instance_loop

REVISION = "routeguide-00001"
CAP = 4


@pytest.fixture
def one_instance_at_max(front: FrontEnd) -> Iterator[Autoscaler]:
    with instance_loop() as loop:
        front.set_revision(REVISION, concurrency=CAP)
        front.set_service("routeguide", [Target(REVISION, 100)])
        launch = Launcher(loop, "routeguide", routeguide.build, {"K_REVISION": REVISION})
        scaler = Autoscaler(
            front, REVISION, launch, Scaling(concurrency=CAP, min_instances=1, max_instances=1)
        )
        scaler.start()
        try:
            yield scaler
        finally:
            scaler.stop()


def note(stream: int, message: str) -> route_guide_pb2.RouteNote:
    return route_guide_pb2.RouteNote(
        location=route_guide_pb2.Point(latitude=stream, longitude=1), message=message
    )


def plain_post(front: FrontEnd, certs: DevCerts, host: str) -> int:
    """The HTTP status a plain (not gRPC) HTTPS caller gets for a POST to `host`: what Cloud Run documents."""
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    context.check_hostname = False  # the socket is the front end's loopback address; the CA is still checked
    connection = http.client.HTTPSConnection("127.0.0.1", front.port, context=context, timeout=CALL_TIMEOUT_S)
    try:
        connection.request("POST", "/routeguide.RouteGuide/GetFeature", body=b"", headers={"Host": host})
        return connection.getresponse().status
    finally:
        connection.close()


async def test_one_stream_past_the_cap_at_max_scale_is_refused_and_the_others_go_on(
    front: FrontEnd, certs: DevCerts, one_instance_at_max: Autoscaler
) -> None:
    scaler = one_instance_at_max
    async with channel(front, certs, front.host("routeguide")) as ch:
        stub = route_guide_pb2_grpc.RouteGuideStub(ch)
        streams = [stub.RouteChat(timeout=CALL_TIMEOUT_S * 3) for _ in range(CAP)]
        for number, stream in enumerate(streams):
            await stream.write(note(number, "first"))
        # Every slot held (as the front end counts them), and the autoscaler, at maxScale, refusing.
        await eventually(lambda: [s.in_flight for s in scaler.instances()] == [CAP], what="the cap in use")
        await eventually(lambda: front.refusing(REVISION), what="the revision refusing at maxScale")

        extra = stub.RouteChat(timeout=CALL_TIMEOUT_S)
        # Headers and end of stream only: a message written while the front end's refusal is on its way races
        # it, and grpcio then reports its own INTERNAL ("Internal error from Core") instead of the refusal.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await extra.done_writing()
        refused, details = await asyncio.wait_for(extra.code(), CALL_TIMEOUT_S), await extra.details()
        status = await asyncio.to_thread(plain_post, front, certs, front.host("routeguide"))
        overflowed = front.stats(rf"^cluster\.{REVISION}\.upstream_rq_pending_overflow$")

        replies = []
        for number, stream in enumerate(streams):
            await stream.write(note(number, "second"))
            await stream.done_writing()
            replies.append([n.message async for n in stream])
        codes = [await s.code() for s in streams]
        instances = scaler.instances()
    assert refused == grpc.StatusCode.UNAVAILABLE, (refused, details)
    assert status == 429, status
    assert overflowed == {f"cluster.{REVISION}.upstream_rq_pending_overflow": 2}, overflowed
    # The streams that held the slots: each answered its second note with its first (RouteChat), and ended OK.
    assert replies == [["first"]] * CAP, replies
    assert codes == [grpc.StatusCode.OK] * CAP, codes
    assert len(instances) == 1, instances  # maxScale held: no instance was added for the extra call
