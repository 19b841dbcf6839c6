"""Deadline propagation across a real relay: ping's SendUpstream calls Send on an upstream that records the
deadline it was given (context.time_remaining()), server side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from mesh import serving
from mesh.testing import NO_REUSEPORT, running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build as build_ping

# gRPC's own deadline arithmetic (timeout header encoding, timer granularity) can hand the server up to about
# 10 ms more than the client asked for, with plain grpc and no mesh code in between.
GRPC_SLACK = 0.03


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


class Recorder(ping_pb2_grpc.PingServiceServicer):
    """An upstream that records each Send's remaining time; a message "hang" waits (bounded) to be cancelled."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        self.remaining.append(context.time_remaining())
        if request.message.startswith("hang"):
            await asyncio.sleep(5)  # longer than any deadline used here; cancelled when the deadline passes
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message))


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, int]]:
    servicer = Recorder()  # type: ignore[abstract]  # SendUpstream is not needed

    def factory(runtime: serving.Runtime) -> Sequence[serving.Service]:
        return [
            serving.Service("ping.PingService", servicer, ping_pb2_grpc.add_PingServiceServicer_to_server)
        ]

    async with running("recorder", factory) as server:
        yield servicer, server.port


def relay_env(port: int, default_timeout: str) -> dict[str, str]:
    return {
        "GRPC_PING_HOST": f"127.0.0.1:{port}",
        "GRPC_PING_INSECURE": "1",
        "DOWNSTREAM_TIMEOUT_SECONDS": default_timeout,
    }


async def send_upstream(port: int, message: str, timeout: float | None) -> ping_pb2.Response:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT) as channel:
        stub = ping(channel)
        return await stub.SendUpstream(ping_pb2.Request(message=message), timeout=timeout)


async def test_the_callers_deadline_reaches_the_upstream_less_the_margin(
    recorder: tuple[Recorder, int],
) -> None:
    servicer, upstream_port = recorder
    env = {**relay_env(upstream_port, "20"), "DOWNSTREAM_DEADLINE_MARGIN_SECONDS": "0.5"}
    async with running("ping", build_ping, env) as relay:
        await send_upstream(relay.port, "long", timeout=3)
        await send_upstream(relay.port, "short", timeout=0.4)  # the margin is at most half of what is left
    long, short = servicer.remaining
    assert long is not None and 3 - 0.5 - 0.3 < long <= 3 - 0.5 + GRPC_SLACK
    assert short is not None and 0 < short <= 0.4 / 2 + GRPC_SLACK


async def test_without_a_caller_deadline_the_default_caps_the_downstream_call(
    recorder: tuple[Recorder, int],
) -> None:
    servicer, upstream_port = recorder
    async with running("ping", build_ping, relay_env(upstream_port, "7")) as relay:
        await send_upstream(relay.port, "no deadline", timeout=None)
        await send_upstream(relay.port, "a longer deadline than the cap", timeout=60)
    assert len(servicer.remaining) == 2
    for remaining in servicer.remaining:
        assert remaining is not None and 0 < remaining <= 7 + GRPC_SLACK


async def test_a_slow_upstream_fails_the_call_with_deadline_exceeded_naming_it(
    recorder: tuple[Recorder, int],
) -> None:
    servicer, upstream_port = recorder
    async with running("ping", build_ping, relay_env(upstream_port, "20")) as relay:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send_upstream(relay.port, "hang", timeout=1)
    # The relay's own answer, in the margin before the caller's deadline: not the caller's local timeout.
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (err.value.details() or "").startswith(
        f"upstream 127.0.0.1:{upstream_port}: "
    ), err.value.details()
