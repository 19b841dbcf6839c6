"""What a routeguide process that verifies tokens answers without one: health Check only (what probes call),
and no more than a few such calls at once; health Watch and reflection want a token like every other method.
The held calls are raw HTTP/2 requests whose message never completes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from emulators.identity import IdentityEmulator
from mesh.server import EXEMPT_CONCURRENCY
from tests.reliability import calls, h2c
from tests.reliability.identity_attacks_test import ALICE, AUDIENCE, HERE, bearer, verifying
from tests.reliability.processes import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

Code = grpc.StatusCode
MAX_CONCURRENT_RPCS = 24
HELD = 40  # more calls held open than the server takes at once
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routeguide(emulator: IdentityEmulator) -> AsyncIterator[Service]:
    env = {**verifying(emulator), "MAX_CONCURRENT_RPCS": str(MAX_CONCURRENT_RPCS)}
    service = await Service("routeguide", env).start()
    yield service
    assert await service.stop() == 0


async def code_of(call: grpc.aio.Call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return Code.OK


async def test_check_answers_without_a_token(routeguide: Service) -> None:
    async with calls.insecure(routeguide.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_watch_and_reflection_want_a_token(routeguide: Service, emulator: IdentityEmulator) -> None:
    async with calls.insecure(routeguide.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await watch.read()
        assert refused.value.code() == Code.UNAUTHENTICATED

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")

        async def ask(metadata: tuple[tuple[str, str], ...]) -> list[str]:
            answers = reflection.ServerReflectionInfo(iter([listing]), metadata=metadata, timeout=10)
            return [s.name async for a in answers for s in a.list_services_response.service]

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ask(())
        assert refused.value.code() == Code.UNAUTHENTICATED
        # With a token of an allowed caller, reflection answers.
        assert "routeguide.RouteGuide" in await ask(bearer(emulator.mint(ALICE, AUDIENCE)))
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), metadata=bearer(emulator.mint(ALICE, AUDIENCE)), timeout=10
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


async def test_held_calls_without_a_token_cannot_starve_real_calls(
    routeguide: Service, emulator: IdentityEmulator
) -> None:
    # 40 Watches (a whole request: the server would answer with a stream it keeps open) and 40 Checks with 3
    # bytes of their 5-byte message prefix, never finished (the server would wait for the rest).
    streams = await h2c.Streams.open("127.0.0.1", routeguide.port)
    try:
        watch = h2c.grpc_message(health_pb2.HealthCheckRequest().SerializeToString())
        held = [streams.start(WATCH, body=watch, end=True) for _ in range(HELD)]
        # The Watches' refusals first: a call counts against MAX_CONCURRENT_RPCS until the server has ended it.
        await streams.pump(lambda: all(streams.done(s) for s in held), timeout=5.0)
        held += [streams.start(CHECK, body=b"\x00\x00\x00") for _ in range(HELD)]
        await streams.pump(lambda: False, timeout=0.3)  # let the server take in what it will
        refused = {
            (streams.outcomes[s].grpc_status, streams.outcomes[s].value("grpc-message"))
            for s in held
            if streams.done(s)
        }
        async with calls.insecure(routeguide.address) as channel:
            token = bearer(emulator.mint(ALICE, AUDIENCE))
            protected = await code_of(calls.routeguide(channel).GetFeature(HERE, metadata=token, timeout=5))
            check = await code_of(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            )
        still_held = sum(not streams.done(s) for s in held)
    finally:
        await streams.close()
    assert protected == Code.OK, (protected, refused)
    # Every Watch refused for want of a token; of the Checks waiting for the rest of their request, the oldest
    # ended to make room for newer ones: at most 16 still held. A Check that arrives while the others are
    # still ending may meet gRPC's own limit first (MAX_CONCURRENT_RPCS): refused at once.
    missing = (
        Code.UNAUTHENTICATED.value[0],
        "missing credentials: send 'authorization: Bearer <ID token>' (or 'x-serverless-authorization')",
    )
    late = (
        Code.DEADLINE_EXCEEDED.value[0],
        "the request message did not arrive within 1 s of the call's headers (or before newer calls waiting for"
        " theirs)",
    )
    limited = (Code.RESOURCE_EXHAUSTED.value[0], "Concurrent RPC limit exceeded!")
    assert {missing, late} <= refused <= {missing, late, limited}, refused
    assert still_held <= EXEMPT_CONCURRENCY, still_held
    # A probe's Check answers: the held Checks hold no slot of the exempt gate (late_requests_test has more).
    assert check == Code.OK
