"""HTTP/2 PING floods against a real ping process, beside a caller with the mesh's keepalive and a steady client.

gRPC's ping policy (mesh.serving: two strikes, pings at most twice as often as the mesh's callers send them)
answers the third ping that comes too early with GOAWAY ENHANCE_YOUR_CALM "too_many_pings", and a short flood's
connection is closed. A flood that goes on is told GOAWAY as well, but gRPC core closes the connection only
once its writes go idle, and the flood's PING ACKs keep them busy: the connection stays open, and costs the
server CPU, for as long as the flood lasts (RELIABILITY.md; the front end is the bound). What must hold
meanwhile: other callers are served, and a caller with the mesh's keepalive keeps its connection.
"""

from __future__ import annotations

import asyncio

import grpc

from mesh.client import Channels
from mesh.settings import CallSettings, Keepalive, Upstream
from ping.ping_pb2 import Request
from tests.reliability import calls, pings
from tests.reliability.figures import report
from tests.reliability.keepalive_test import left_ready
from tests.reliability.processes import Service, kill_all

KEEPALIVE = Keepalive(time=1.0, timeout=1.0)  # the mesh's keepalive, made fast so that the test sees pings
ENV = {
    "KEEPALIVE_TIME_SECONDS": str(KEEPALIVE.time),
    "KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE.timeout),
    "WORKER_PROCESSES": "1",  # the process measured is the server
}
FLOOD_SECONDS = 3.0
FLOOD_PINGS = 4_000_000  # far more than 3 s allow on loopback: the time bounds the flood


async def _flood(service: Service, *, count: int, burst: int) -> pings.Flood:
    return await asyncio.to_thread(
        pings.flood, "127.0.0.1", service.port, pings=count, seconds=FLOOD_SECONDS, burst=burst
    )


async def test_a_few_pings_too_many_are_told_too_many_pings_and_cut_off() -> None:
    service = await Service("ping", ENV).start()
    try:
        flood = await _flood(service, count=16, burst=1)
    finally:
        await kill_all([service])
    assert (flood.goaway, flood.goaway_debug) == (pings.ENHANCE_YOUR_CALM, "too_many_pings"), flood
    assert flood.closed_after is not None, f"the server kept the connection open: {flood}"


async def test_a_ping_flood_is_told_too_many_pings_while_other_callers_are_served() -> None:
    service = await Service("ping", ENV).start()
    owner = Channels(None, calls=CallSettings(keepalive=KEEPALIVE, connect_timeout=1.0))
    steady_channel = calls.insecure(service.address)
    try:
        mesh = owner.open(Upstream(service.address, insecure=True, unauthenticated=True))
        await calls.ping(mesh).Send(Request(message="before"), timeout=5)
        steady_stub = calls.ping(steady_channel)
        steady = calls.SteadyClient(lambda: steady_stub.Send(Request(message="steady"), timeout=5)).start()
        before = service.usage()
        # The mesh's caller stays idle through the flood: only its keepalive pings go out, and they must not
        # draw the GOAWAY that the flood draws.
        flood, mesh_left_ready = await asyncio.gather(
            _flood(service, count=FLOOD_PINGS, burst=4096), left_ready(mesh, FLOOD_SECONDS + 2.0)
        )
        after = service.usage()
        served = await steady.stop()
        assert (flood.goaway, flood.goaway_debug) == (pings.ENHANCE_YOUR_CALM, "too_many_pings"), flood
        assert served.errors == [], served.errors[:5]
        assert served.calls >= 10, f"only {served.calls} steady calls in {FLOOD_SECONDS + 2.0} s"
        assert mesh_left_ready is None, f"the mesh's caller lost its connection after {mesh_left_ready} s"
        await calls.ping(mesh).Send(Request(message="after"), timeout=5)
        assert mesh.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await steady_channel.close()
        await owner.close()
        await kill_all([service])
    cpu = after.cpu_seconds - before.cpu_seconds
    report(
        "ping_flood",
        {
            "flood_s": round(flood.seconds, 2),
            "pings_sent": flood.sent,
            "pings_sent_per_s": round(flood.sent / flood.seconds),
            "pings_acked": flood.acked,
            "goaway_after_s": flood.goaway_after and round(flood.goaway_after, 3),
            "closed_by_server_after_s": flood.closed_after and round(flood.closed_after, 3),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_share": round(cpu / (flood.seconds + 2.0), 2),
            "rss_kb_before_after": [before.rss_kb, after.rss_kb],
            "steady_calls": served.calls,
        },
    )
