"""The front end as callers outside Cloud Run see it: one TLS connection to a service's `run.app` name, each
request balanced over the revision's instances, traffic split by percent, tags, unknown hosts, the request
timeout, an instance withdrawn then stopped under load, and nothing left running once it stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from cloudrun.frontend import FrontEnd, FrontEndError, Target
from emulators.dev_ca import DevCerts
from mesh.testing import running
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.routeguide import main as routeguide
from tests.cloudrun.instances import (
    CALL_TIMEOUT_S,
    PROJECT_NUMBER,
    REGION,
    answers,
    by_revision,
    channel,
    instance,
    load,
    ports,
)

BLUE, GREEN = "ping-00001-abc", "ping-00002-def"
# Envoy picks a revision at random per request: 1,600 calls put a 5-point margin at 4 standard deviations for
# a 50/50 split (more for 10/90), so the check is exact in practice, never flaky.
SPLIT_CALLS = 1600


async def deploy(front: FrontEnd, service: str, *traffic: Target, timeout_s: float = 300.0) -> None:
    for target in traffic:
        await asyncio.to_thread(front.set_revision, target.revision, timeout_s=timeout_s)
    await asyncio.to_thread(front.set_service, service, list(traffic))


async def test_one_connection_is_balanced_per_request_over_the_revisions_instances(
    front: FrontEnd, certs: DevCerts
) -> None:
    async with instance(BLUE) as first, instance(BLUE) as second:
        await deploy(front, "ping", Target(BLUE, 100))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(first, second))
        async with channel(front, certs, front.host("ping") + ":443") as ch:
            seen = await answers(ping_pb2_grpc.PingServiceStub(ch), 200)
    assert set(seen) == {f"{BLUE}@{first.port}", f"{BLUE}@{second.port}"}, seen
    assert min(seen.values()) >= 70, seen  # 35% each: per request, not per connection


@pytest.mark.parametrize("green_percent", [10, 50])
async def test_the_traffic_split_follows_the_percents_and_a_tag_reaches_its_revision(
    front: FrontEnd, certs: DevCerts, green_percent: int
) -> None:
    async with instance(BLUE) as blue, instance(GREEN) as green:
        await deploy(front, "ping", Target(BLUE, 100 - green_percent), Target(GREEN, green_percent, "canary"))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(blue))
        await asyncio.to_thread(front.set_endpoints, GREEN, ports(green))
        async with channel(front, certs, front.host("ping")) as ch:
            split = by_revision(await answers(ping_pb2_grpc.PingServiceStub(ch), SPLIT_CALLS))
        async with channel(front, certs, front.host("ping", "canary") + ":443") as ch:
            tagged = by_revision(await answers(ping_pb2_grpc.PingServiceStub(ch), 100))
    measured = 100 * split[GREEN] / SPLIT_CALLS
    assert abs(measured - green_percent) <= 5, split
    assert split[BLUE] + split[GREEN] == SPLIT_CALLS, split
    assert tagged == Counter({GREEN: 100}), tagged


async def test_revisions_and_instances_change_under_one_connection_without_a_restart(
    front: FrontEnd, certs: DevCerts
) -> None:
    pid = front.pid
    async with instance(BLUE) as blue, instance(GREEN) as green, instance(GREEN) as green2:
        await deploy(front, "ping", Target(BLUE, 100))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(blue))
        async with channel(front, certs, front.host("ping")) as ch:
            stub = ping_pb2_grpc.PingServiceStub(ch)
            first = by_revision(await answers(stub, 40))
            await deploy(front, "ping", Target(GREEN, 100))  # a new revision takes all the traffic
            await asyncio.to_thread(front.set_endpoints, GREEN, ports(green))
            second = by_revision(await answers(stub, 40))
            await asyncio.to_thread(front.set_endpoints, GREEN, ports(green, green2))  # scaled out
            third = await answers(stub, 40)
            await asyncio.to_thread(front.remove_revision, BLUE)
            fourth = by_revision(await answers(stub, 40))
        connections = front.stats(r"^http\.cloudrun\.downstream_cx_total$")
    assert (first, second, fourth) == (Counter({BLUE: 40}), Counter({GREEN: 40}), Counter({GREEN: 40}))
    assert set(third) == {f"{GREEN}@{green.port}", f"{GREEN}@{green2.port}"}, third
    assert front.pid == pid
    assert connections == {
        "http.cloudrun.downstream_cx_total": 1
    }, connections  # the caller never reconnected


async def test_an_unknown_host_is_unimplemented(front: FrontEnd, certs: DevCerts) -> None:
    async with instance(BLUE) as blue:
        await deploy(front, "ping", Target(BLUE, 100))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(blue))
        async with channel(front, certs, front.host("pong")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await ping_pb2_grpc.PingServiceStub(ch).Send(ping_pb2.Request(), timeout=CALL_TIMEOUT_S)
        async with channel(
            front, certs, front.host("ping")
        ) as ch:  # the same connection setup serves a known one
            await ping_pb2_grpc.PingServiceStub(ch).Send(ping_pb2.Request(), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, raised.value


async def test_the_revisions_timeout_ends_a_call_that_outlives_it(front: FrontEnd, certs: DevCerts) -> None:
    async with instance(BLUE) as blue:
        await deploy(front, "ping", Target(BLUE, 100), timeout_s=1)
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(blue))
        async with channel(front, certs, front.host("ping")) as ch:
            stub = ping_pb2_grpc.PingServiceStub(ch)
            await stub.Send(
                ping_pb2.Request(message="sleep 0.1"), timeout=CALL_TIMEOUT_S
            )  # within it: answered
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Send(ping_pb2.Request(message="sleep 8"), timeout=CALL_TIMEOUT_S)
            took = time.monotonic() - started
    # Ended at the revision's 1 s (a bound generous for a busy machine), long before the client's own 10 s
    # deadline or the handler's 8 s: by the front end or by the instance, which the front end told (the
    # call's grpc-timeout); DEADLINE_EXCEEDED either way.
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (took, raised.value)
    assert took < 6, took


async def test_the_revisions_timeout_bounds_a_streams_whole_life(front: FrontEnd, certs: DevCerts) -> None:
    async with running("routeguide", routeguide.build, {"K_REVISION": "routeguide-00001"}) as server:
        await deploy(front, "routeguide", Target("routeguide-00001", 100), timeout_s=1)
        await asyncio.to_thread(front.set_endpoints, "routeguide-00001", [server.port])
        async with channel(front, certs, front.host("routeguide")) as ch:
            chat = route_guide_pb2_grpc.RouteGuideStub(ch).RouteChat(timeout=CALL_TIMEOUT_S)
            started = time.monotonic()
            await chat.write(route_guide_pb2.RouteNote(message="open, never half-closed"))
            code = await asyncio.wait_for(chat.code(), CALL_TIMEOUT_S)
            took = time.monotonic() - started
    # An open stream (the request never ends) is bounded too: at the revision's 1 s, not the call's 10 s. It
    # had answered (its headers), so the front end can only reset it: INTERNAL "Stream removed".
    assert code == grpc.StatusCode.INTERNAL, (code, await chat.details(), took)
    assert took < 6, took


async def test_an_instance_withdrawn_then_stopped_under_load_loses_no_call(
    front: FrontEnd, certs: DevCerts
) -> None:
    async with instance(BLUE) as staying, contextlib.AsyncExitStack() as leaving_stack:
        leaving = await leaving_stack.enter_async_context(instance(BLUE))
        await deploy(front, "ping", Target(BLUE, 100))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(staying, leaving))
        async with channel(front, certs, front.host("ping")) as ch, load(
            ping_pb2_grpc.PingServiceStub(ch)
        ) as calls:
            before = await calls.more(200)
            # Cloud Run's order: out of the front end's endpoints first, then SIGTERM and the drain.
            await asyncio.to_thread(front.set_endpoints, BLUE, ports(staying))
            await leaving_stack.aclose()
            after = await calls.more(300)
    assert calls.failed == Counter(), calls.failed
    assert before[f"{BLUE}@{leaving.port}"] >= 50, before  # it had its share until it was withdrawn
    assert set(after) == {f"{BLUE}@{staying.port}"}, after


async def test_a_rollout_under_load_loses_no_call(front: FrontEnd, certs: DevCerts) -> None:
    async with instance(BLUE) as blue, instance(GREEN) as green:
        await deploy(front, "ping", Target(BLUE, 100))
        await asyncio.to_thread(front.set_endpoints, BLUE, ports(blue))
        await asyncio.to_thread(front.set_revision, GREEN)
        await asyncio.to_thread(front.set_endpoints, GREEN, ports(green))
        async with channel(front, certs, front.host("ping")) as ch, load(
            ping_pb2_grpc.PingServiceStub(ch)
        ) as calls:
            steps = [by_revision(await calls.more(100))]
            for green_percent in (10, 50, 100):
                traffic = [Target(BLUE, 100 - green_percent), Target(GREEN, green_percent)]
                await asyncio.to_thread(front.set_service, "ping", traffic)
                await calls.more(50)  # the calls in flight as the traffic moved may be answered by either
                steps.append(by_revision(await calls.more(200)))
    assert calls.failed == Counter(), calls.failed
    assert set(steps[0]) == {BLUE} and set(steps[-1]) == {GREEN}, steps
    assert steps[1][GREEN] > 0 and steps[2][BLUE] > 0, steps  # the steps between split for real


def envoys_of(parent: int) -> list[int]:
    """The envoy processes that are children of `parent` (zombies included: not yet reaped is not gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            comm, _, rest = stat.read_text().partition(")")
            if comm.endswith("(envoy") and int(rest.split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def test_the_front_end_stops_and_leaves_no_envoy(certs: DevCerts) -> None:
    def front_end() -> FrontEnd:
        return FrontEnd(certs.server_cert, certs.server_key, project_number=PROJECT_NUMBER, region=REGION)

    before = set(envoys_of(os.getpid()))
    started = front_end().start()
    assert started.pid in envoys_of(os.getpid())
    started.stop()
    started.stop()  # idempotent
    with pytest.raises(RuntimeError, match="a failing test"):
        with front_end() as failing:
            assert failing.pid in envoys_of(os.getpid())
            raise RuntimeError("a failing test")
    assert set(envoys_of(os.getpid())) == before


def test_a_wrong_change_is_refused_with_what_to_do_and_changes_nothing(front: FrontEnd) -> None:
    front.set_revision(BLUE)
    with pytest.raises(FrontEndError, match="add up to 100"):
        front.set_service("ping", [Target(BLUE, 90)])
    with pytest.raises(FrontEndError, match=f"{GREEN}.*set_revision first"):
        front.set_service("ping", [Target(BLUE, 50), Target(GREEN, 50)])
    with pytest.raises(FrontEndError, match="set_revision first"):
        front.set_endpoints(GREEN, [1])
    front.set_service("ping", [Target(BLUE, 100)])
    with pytest.raises(FrontEndError, match="still has traffic"):
        front.remove_revision(BLUE)
    front.wait_applied()  # what Envoy holds is still what was accepted
