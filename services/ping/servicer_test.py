from __future__ import annotations

import time

import grpc
import pytest

from mesh import ConfigError
from mesh.testing import NO_REUSEPORT, running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build


def stub(port: int) -> tuple[grpc.aio.Channel, ping_pb2_grpc.PingServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT)
    return channel, ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


async def test_send_echoes_with_index_one_and_the_receive_time() -> None:
    async with running("ping", build) as server:
        channel, ping = stub(server.port)
        before = time.time()
        reply = await ping.Send(ping_pb2.Request(message="hello"))
        await channel.close()
    assert (reply.pong.index, reply.pong.message) == (1, "hello")
    assert before - 1 <= reply.pong.received_on.ToNanoseconds() / 1e9 <= time.time() + 1


async def test_send_upstream_relays_through_a_second_instance() -> None:
    async with running("ping-upstream", build) as upstream:
        env = {"GRPC_PING_HOST": f"127.0.0.1:{upstream.port}", "GRPC_PING_INSECURE": "1"}
        async with running("ping", build, env) as relay:
            channel, ping = stub(relay.port)
            reply = await ping.SendUpstream(ping_pb2.Request(message="hi"))
            await channel.close()
    assert reply.pong.message == "hi (relayed)"
    assert reply.pong.index == 1


async def test_send_upstream_without_upstream_is_failed_precondition_naming_the_variable() -> None:
    async with running("ping", build) as server:
        channel, ping = stub(server.port)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ping.SendUpstream(ping_pb2.Request(message="hi"))
        await channel.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GRPC_PING_HOST" in (err.value.details() or "")


async def test_upstream_errors_keep_their_code_and_name_the_upstream() -> None:
    # A port nobody listens on: bind-and-close would race with other programs, so use the relay's own
    # upstream pointing at a stopped server.
    async with running("ping-upstream", build) as gone:
        dead = f"127.0.0.1:{gone.port}"
    env = {"GRPC_PING_HOST": dead, "GRPC_PING_INSECURE": "true"}
    async with running("ping", build, env) as relay:
        channel, ping = stub(relay.port)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ping.SendUpstream(ping_pb2.Request(message="hi"), timeout=5)
        assert (await ping.Send(ping_pb2.Request(message="still up"))).pong.message == "still up"
        await channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"upstream {dead}" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"GRPC_PING_HOST": "no-port"}, "GRPC_PING_HOST"),
        ({"GRPC_PING_HOST": "h:1", "GRPC_PING_INSECURE": "maybe"}, "GRPC_PING_INSECURE"),
        ({"PORT": "http"}, "PORT"),
    ],
)
async def test_a_wrong_setting_stops_start_up_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        async with running("ping", build, env):
            pass
