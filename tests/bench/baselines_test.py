"""The benchmark's baseline servers answer Send as the service does, and the naive build checks its callers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from localmesh.supervisor import StartError
from ping import ping_pb2, ping_pb2_grpc
from tests.bench.fixture import CLIENT, Fixture, audience, service_argv
from tests.bench.processes import Server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def fx() -> AsyncIterator[Fixture]:
    fixture = Fixture()
    await fixture.start()
    yield fixture
    await fixture.stop()


async def send(fx: Fixture, port: int, tls: bool, token: str | None) -> ping_pb2.Response:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with fx.channel(port, tls) as channel:
        stub = ping_pb2_grpc.PingServiceStub(channel)
        return await stub.Send(ping_pb2.Request(message="hello"), metadata=metadata, timeout=10)


@pytest.mark.parametrize("model", ["aio", "uvloop", "sync4", "sync256"])
async def test_each_raw_model_echoes_the_message(fx: Fixture, model: str) -> None:
    argv = service_argv("tests.bench.raw_server") + ["ping", model]
    async with Server("raw", argv, fx.base_env(), None) as server:
        reply = await send(fx, server.port, False, None)
    assert reply.pong.message == "hello" and reply.pong.received_on.seconds > 0


async def test_raw_server_refuses_an_unknown_model(fx: Fixture) -> None:
    argv = service_argv("tests.bench.raw_server") + ["ping", "threads"]
    with pytest.raises(StartError, match="usage: raw_server"):
        async with Server("raw", argv, fx.base_env(), None):
            pass


async def test_naive_build_serves_tls_to_an_allowed_caller_only(fx: Fixture) -> None:
    argv = service_argv("tests.bench.naive_server") + ["4"]
    async with Server("naive", argv, fx.featured_env("ping"), None) as server:
        assert (await send(fx, server.port, True, fx.token("ping"))).pong.message == "hello"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await send(fx, server.port, True, None)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong_audience = fx.identity.mint(CLIENT, audience("routeguide"))
        with pytest.raises(grpc.aio.AioRpcError) as misdirected:
            await send(fx, server.port, True, wrong_audience)
        assert misdirected.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stranger = fx.identity.mint(CLIENT, audience("ping"), email="someone@else.example")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(fx, server.port, True, stranger)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Still serving after the refusals.
        assert (await send(fx, server.port, True, fx.token("ping"))).pong.message == "hello"
