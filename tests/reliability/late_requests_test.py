"""Callers that send a call's headers and hold back its request message, on both serving models (ping: grpc.server
threads; routeguide: grpc.aio), against processes that verify tokens: the probe's token-less health Check still
answers at once, the held Checks are ended within seconds, and authenticated callers holding back their Send
do not stall ping's Send for the others."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emulators.identity import IdentityEmulator
from ping import ping_pb2
from tests.reliability import calls, h2c
from tests.reliability.identity_attacks_test import ALICE, AUDIENCE, bearer, verifying
from tests.reliability.processes import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHECK = "/grpc.health.v1.Health/Check"
SEND = "/ping.PingService/Send"
STALLED_CHECKS = 64
STALLED_SENDS = 32
SENDS = 100
Code = grpc.StatusCode
# How a held call may end: grpc.aio answers DEADLINE_EXCEEDED; grpc.server's threads cancel it (CANCELLED).
ENDED = {Code.DEADLINE_EXCEEDED.value[0], Code.CANCELLED.value[0]}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def services(emulator: IdentityEmulator) -> AsyncIterator[dict[str, Service]]:
    started = {name: await Service(name, verifying(emulator)).start() for name in ("ping", "routeguide")}
    yield started
    for service in started.values():
        assert await service.stop() == 0


def ended(outcome: h2c.Outcome) -> bool:
    """Ended by the server as a held call should be: a status of ENDED, or the stream reset."""
    return outcome.grpc_status in ENDED or outcome.reset is not None


@pytest.mark.parametrize("name", ["ping", "routeguide"])
async def test_checks_that_hold_their_request_back_do_not_starve_the_probe(
    services: dict[str, Service], name: str
) -> None:
    service = services[name]
    streams = await h2c.Streams.open("127.0.0.1", service.port)
    try:
        held = [streams.start(CHECK) for _ in range(STALLED_CHECKS)]  # headers only, never the message
        await streams.pump(lambda: False, timeout=0.5)  # the server takes them in
        async with calls.insecure(service.address) as channel:
            probe = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        all_ended = await streams.pump(lambda: all(streams.done(s) for s in held), timeout=10)
        outcomes = [streams.outcomes[s] for s in held]
    finally:
        await streams.close()
    assert probe.status == health_pb2.HealthCheckResponse.SERVING
    assert all_ended, sum(not o.ended and o.grpc_status is None and o.reset is None for o in outcomes)
    assert all(ended(o) for o in outcomes), {
        (o.grpc_status, o.value("grpc-message"), o.reset) for o in outcomes
    }


async def test_senders_that_hold_their_request_back_do_not_stall_send(
    services: dict[str, Service], emulator: IdentityEmulator
) -> None:
    ping = services["ping"]
    token = bearer(emulator.mint(ALICE, AUDIENCE))
    async with calls.insecure(ping.address) as channel:
        stub = calls.ping(channel)
        await stub.Send(ping_pb2.Request(message="connected"), metadata=token, timeout=5)
        streams = await h2c.Streams.open("127.0.0.1", ping.port)
        try:
            held = [streams.start(SEND, token) for _ in range(STALLED_SENDS)]  # admitted, then no message
            await streams.pump(lambda: False, timeout=0.5)
            latencies = []
            for index in range(SENDS):
                began = time.perf_counter()
                reply = await stub.Send(ping_pb2.Request(message=str(index)), metadata=token, timeout=5)
                latencies.append(time.perf_counter() - began)
                assert reply.pong.message == str(index)
            still_held = sum(not streams.done(s) for s in held)
        finally:
            await streams.close()
    # The held Sends were not ended (their bound is far longer): the other callers went past them.
    assert still_held == STALLED_SENDS
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
    assert p99 < 0.100, f"p99 {p99 * 1000:.1f} ms; slowest {max(latencies) * 1000:.1f} ms"
