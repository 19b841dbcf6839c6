"""The caller's deadline reaches the instance through the front end, as through Cloud Run's: a service that
passes the time left on to its own downstream calls (mesh.deadlines) needs it to answer before its caller
gives up. Envoy alone sends its route's timeout on instead: the instance saw the revision's timeoutSeconds
(3600 s) as the time left (cloudrun.xds.CALLER_TIMEOUT)."""

from __future__ import annotations

import asyncio
import json

import grpc

from cloudrun.frontend import FrontEnd, Target
from emulators.dev_ca import DevCerts
from mesh import serving
from mesh.testing import running
from ping import ping_pb2, ping_pb2_grpc
from tests.cloudrun.instances import channel

CALLER_DEADLINE_S = 2.0


class TimeLeft(ping_pb2_grpc.PingServiceServicer):
    """Send answers with the seconds its call has left, and the names of the headers it was sent."""

    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        headers = sorted(key for key, _ in context.invocation_metadata() or ())
        return ping_pb2.Response(pong=ping_pb2.Pong(message=json.dumps([context.time_remaining(), headers])))

    async def SendUpstream(
        self, request: ping_pb2.Request, context: grpc.aio.ServicerContext
    ) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "an instance of this test has no upstream")
        raise AssertionError("abort raises")


def build(runtime: serving.Runtime) -> list[serving.Service]:
    return [serving.Service("ping.PingService", TimeLeft(), ping_pb2_grpc.add_PingServiceServicer_to_server)]


async def test_the_instance_sees_the_time_its_caller_has_left(front: FrontEnd, certs: DevCerts) -> None:
    async with running("ping", build, {"K_REVISION": "ping-00001-abc"}) as server:
        await asyncio.to_thread(front.set_revision, "ping-00001-abc", timeout_s=3600)
        await asyncio.to_thread(front.set_endpoints, "ping-00001-abc", [server.port])
        await asyncio.to_thread(front.set_service, "ping", [Target("ping-00001-abc", 100)])
        async with channel(front, certs, f"{front.host('ping')}:443") as caller:
            stub = ping_pb2_grpc.PingServiceStub(caller)
            reply = await stub.Send(ping_pb2.Request(message="time?"), timeout=CALLER_DEADLINE_S)
            # A caller with no deadline: the revision's timeout bounds the call, and the instance sees that.
            unbounded = await stub.Send(ping_pb2.Request(message="time?"))
    (left, headers), (unbounded_left, _) = json.loads(reply.pong.message), json.loads(unbounded.pong.message)
    assert 0 < left <= CALLER_DEADLINE_S, left
    assert 3500 < unbounded_left <= 3600, unbounded_left
    assert not [
        h for h in headers if h.startswith("x-cloudrun")
    ], headers  # the front end's own copy stays there
