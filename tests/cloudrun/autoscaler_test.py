"""Instances that scale by concurrency, through the front end, under load: unary Send (ping), ListFeatures and
50 open RouteChat streams (routeguide) while routeguide goes 1 -> 3 -> 1 instances, driven by what is in
flight; no call fails, every stream ends OK, and an instance holding an open stream is kept (draining) until
the stream ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from cloudrun.autoscaler import Autoscaler, Scaling
from cloudrun.frontend import FrontEnd, Target
from emulators.dev_ca import DevCerts
from mesh.testing import eventually
from ping import ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.ping import main as ping
from services.routeguide import main as routeguide
from tests.cloudrun.instances import CALL_TIMEOUT_S, channel, load, looping
from tests.cloudrun.launcher import Launcher, instance_loop

ROUTEGUIDE, PING = "routeguide-00001", "ping-00001"
STREAMS, KEEP_EVERY = 50, 4
# 50 streams need 3 instances at 60% of 30 (ceil(50 / 18)); the 13 kept open need one.
STREAM_CAP = 30
SCALING = Scaling(concurrency=STREAM_CAP, min_instances=1, max_instances=3, idle_s=1.0)
WORLD = route_guide_pb2.Rectangle(
    lo=route_guide_pb2.Point(latitude=400000000, longitude=-750000000),
    hi=route_guide_pb2.Point(latitude=420000000, longitude=-730000000),
)


@contextlib.asynccontextmanager
async def scaled(
    front: FrontEnd, service: str, revision: str, launch: Launcher, scaling: Scaling
) -> AsyncIterator[Autoscaler]:
    await asyncio.to_thread(front.set_revision, revision, concurrency=scaling.concurrency)
    await asyncio.to_thread(front.set_service, service, [Target(revision, 100)])
    scaler = Autoscaler(front, revision, launch, scaling)
    await asyncio.to_thread(scaler.start)
    try:
        yield scaler
    finally:
        await asyncio.to_thread(scaler.stop)


def note(stream: int, message: str) -> route_guide_pb2.RouteNote:
    return route_guide_pb2.RouteNote(
        location=route_guide_pb2.Point(latitude=stream, longitude=2), message=message
    )


async def finish(stream: grpc.aio.StreamStreamCall, number: int) -> tuple[list[str], grpc.StatusCode]:
    """The stream's second note at its location, then its end: RouteChat answers with the first note."""
    await stream.write(note(number, "second"))
    await stream.done_writing()
    return [n.message async for n in stream], await stream.code()


async def test_instances_follow_the_load_and_scale_in_loses_nothing(front: FrontEnd, certs: DevCerts) -> None:
    with instance_loop() as loop:
        routeguides = Launcher(loop, "routeguide", routeguide.build, {"K_REVISION": ROUTEGUIDE})
        pings = Launcher(loop, "ping", ping.build, {"K_REVISION": PING})
        async with scaled(front, "routeguide", ROUTEGUIDE, routeguides, SCALING) as scaler, scaled(
            front, "ping", PING, pings, Scaling(concurrency=4, min_instances=1, max_instances=3, idle_s=1.0)
        ), channel(front, certs, front.host("routeguide")) as rg, channel(
            front, certs, front.host("ping")
        ) as pg:
            stub = route_guide_pb2_grpc.RouteGuideStub(rg)
            counts = [len(scaler.instances())]

            async def features() -> str:
                return str(len([f async for f in stub.ListFeatures(WORLD, timeout=CALL_TIMEOUT_S)]))

            async with load(ping_pb2_grpc.PingServiceStub(pg)) as sends, looping(features, 4) as lists:
                await sends.more(50)
                streams = []
                for number in range(STREAMS):  # a caller's streams, opened one after the other
                    streams.append(stub.RouteChat(timeout=CALL_TIMEOUT_S * 6))
                    await streams[-1].write(note(number, "first"))
                    await asyncio.sleep(0.02)
                await eventually(lambda: len(scaler.instances()) == 3, within=20, what="3 instances")
                counts.append(len(scaler.instances()))
                await eventually(
                    lambda: sum(s.in_flight for s in scaler.instances()) >= STREAMS,
                    within=20,
                    what="the streams",
                )

                # Most streams end; every KEEP_EVERY-th stays open (streams opened over the whole scale-out, so on
                # every instance): scale-in drains the excess instances, which keep their open streams (and
                # stay) until those end.
                kept = [(n, s) for n, s in enumerate(streams) if n % KEEP_EVERY == 0]
                ending = [(n, s) for n, s in enumerate(streams) if n % KEEP_EVERY]
                ended = await asyncio.gather(*(finish(s, n) for n, s in ending))
                await eventually(
                    lambda: any(s.draining for s in scaler.instances()), within=20, what="draining"
                )
                await asyncio.sleep(0.5)  # the calls in flight as it began draining are over; streams are not
                holding = {s.port for s in scaler.instances() if s.draining and s.in_flight}
                await asyncio.sleep(SCALING.idle_s * 3)  # long past the idle period of an instance with none
                held = {s.port for s in scaler.instances()}
                ended += await asyncio.gather(*(finish(s, n) for n, s in kept))
                await eventually(lambda: len(scaler.instances()) == 1, within=20, what="back to 1 instance")
                counts.append(len(scaler.instances()))
                await sends.more(50)
                await lists.more(10)
    stopped_holding = [
        i.in_flight_at_stop for i in routeguides.started + pings.started if i.in_flight_at_stop
    ]
    assert counts == [1, 3, 1], counts
    assert sends.failed == Counter() and lists.failed == Counter(), (sends.failed, lists.failed)
    assert ended == [(["first"], grpc.StatusCode.OK)] * STREAMS, ended
    assert holding and holding <= held, (holding, held)  # an instance with an open stream was not removed
    assert stopped_holding == [], stopped_holding  # no instance was stopped with a call in its handlers
    assert len(routeguides.started) >= 3, routeguides.started
