"""Keepalive as the mesh configures it (mesh.client._channels.connection_options, mesh.serving.keepalive_policy), on
real routeguide processes: a channel pinging every second stays connected to a server of the same settings
(no GOAWAY "too_many_pings", which a server with the default policy does send), and notices within the
keepalive bound when that server freezes."""

from __future__ import annotations

import asyncio
import signal

import grpc

from mesh.client import Channels
from mesh.settings import CallSettings, Keepalive, Upstream
from routeguide.route_guide_pb2 import Point
from tests.reliability import calls
from tests.reliability.figures import report
from tests.reliability.processes import Service, kill_all

KEEPALIVE = Keepalive(time=1.0, timeout=1.0)
READY = grpc.ChannelConnectivity.READY


async def left_ready(channel: grpc.aio.Channel, within: float) -> float | None:
    """Seconds until the channel leaves READY, or None if it stayed READY for `within` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(channel.wait_for_state_change(READY), within)
    except asyncio.TimeoutError:
        return None
    return round(loop.time() - started, 3)


async def test_pings_every_second_draw_no_goaway_and_a_frozen_server_is_noticed_within_the_bound() -> None:
    env = {"KEEPALIVE_TIME_SECONDS": str(KEEPALIVE.time), "KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE.timeout)}
    matching = Service("routeguide", env)
    default = Service("routeguide-default-policy", {}, kind="routeguide")  # accepts a ping every 10 s at most
    owner = Channels(None, calls=CallSettings(keepalive=KEEPALIVE, connect_timeout=1.0))
    try:
        await asyncio.gather(matching.start(), default.start())
        to_matching, to_default = (
            owner.open(Upstream(server.address, insecure=True, unauthenticated=True))
            for server in (matching, default)
        )
        for channel in (to_matching, to_default):
            await calls.routeguide(channel).GetFeature(Point(latitude=1, longitude=1), timeout=5)
            assert channel.get_state() == READY
        # Six keepalive periods with no call: the default policy's strikes end in GOAWAY (the control);
        # the matching policy keeps the connection.
        stayed, dropped = await asyncio.gather(left_ready(to_matching, 6.0), left_ready(to_default, 6.0))
        assert stayed is None, f"the channel left READY after {stayed} s with matching settings"
        assert dropped is not None, "the default policy did not send GOAWAY: the control did not fail"

        matching.signal(signal.SIGSTOP)
        bound = KEEPALIVE.detection_bound
        noticed = await left_ready(to_matching, bound + 3.0)  # bounded wait; slack for a busy machine
        matching.signal(signal.SIGCONT)
        assert noticed is not None, f"a frozen server went unnoticed for {bound + 3.0} s"
        # Found again without a new channel.
        for _ in range(40):
            try:
                await calls.routeguide(to_matching).GetFeature(Point(latitude=1, longitude=1), timeout=2)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.25)
        assert to_matching.get_state() == READY
    finally:
        await owner.close()
        await kill_all([matching, default])
    report(
        "keepalive",
        {
            "time_s": KEEPALIVE.time,
            "timeout_s": KEEPALIVE.timeout,
            "default_policy_goaway_after_s": dropped,
            "frozen_peer_noticed_after_s": noticed,
            "bound_s": bound,
        },
    )
