"""The channel factory against real servers: plaintext, TLS with a custom CA, TLS with the system roots (which
must reject the development CA), reuse of one channel per upstream, and the retry policy for UNAVAILABLE."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs
from mesh import serving
from mesh.client import Channels
from mesh.settings import Upstream
from mesh.testing import running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build as build_ping


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


@pytest.fixture
def certs(tmp_path: Path) -> DevCerts:
    return ensure_dev_certs(tmp_path)


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    owner = Channels(None)
    yield owner
    await owner.close()


def tls_env(certs: DevCerts) -> dict[str, str]:
    return {"TLS_CERT_FILE": str(certs.server_cert), "TLS_KEY_FILE": str(certs.server_key)}


async def send(channel: grpc.aio.Channel, message: str = "hi") -> str:
    reply = await ping(channel).Send(ping_pb2.Request(message=message), timeout=5)
    return reply.pong.message


async def test_plaintext_upstream(channels: Channels) -> None:
    async with running("ping", build_ping) as server:
        channel = channels.open(Upstream(f"127.0.0.1:{server.port}", insecure=True))
        assert await send(channel, "plain") == "plain"


async def test_tls_with_a_custom_ca_file(channels: Channels, certs: DevCerts) -> None:
    async with running("ping", build_ping, tls_env(certs)) as server:
        upstream = Upstream(f"127.0.0.1:{server.port}", unauthenticated=True, ca_file=certs.ca_cert)
        assert await send(channels.open(upstream), "custom ca") == "custom ca"


async def test_tls_authority_override_names_the_certificate_host(channels: Channels, certs: DevCerts) -> None:
    # Connect to the address, verify the certificate for `localhost` (one of the dev certificate's names).
    async with running("ping", build_ping, tls_env(certs)) as server:
        upstream = Upstream(
            f"127.0.0.1:{server.port}", unauthenticated=True, ca_file=certs.ca_cert, authority="localhost"
        )
        assert await send(channels.open(upstream), "authority") == "authority"
        wrong = Upstream(
            f"127.0.0.1:{server.port}",
            unauthenticated=True,
            ca_file=certs.ca_cert,
            authority="elsewhere.example",
        )
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await send(channels.open(wrong))
    assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_system_roots_reject_the_development_ca(channels: Channels, certs: DevCerts) -> None:
    async with running("ping", build_ping, tls_env(certs)) as server:
        upstream = Upstream(f"127.0.0.1:{server.port}", unauthenticated=True)  # no ca_file: system roots
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await send(channels.open(upstream))
    assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_channel_to_a_tls_server_fails(channels: Channels, certs: DevCerts) -> None:
    async with running("ping", build_ping, tls_env(certs)) as server:
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await send(channels.open(Upstream(f"127.0.0.1:{server.port}", insecure=True)))
    assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_authenticated_upstream_needs_a_token_source(channels: Channels) -> None:
    with pytest.raises(ValueError, match="ID token"):
        channels.open(Upstream("ping.example:443"))


async def test_one_channel_per_upstream() -> None:
    owner = Channels(None)
    a = Upstream("127.0.0.1:1001", insecure=True)
    b = Upstream("127.0.0.1:1002", insecure=True)
    first = owner.open(a)
    assert owner.open(Upstream("127.0.0.1:1001", insecure=True)) is first  # equal settings, same channel
    assert owner.open(b) is not first
    await owner.close()
    # Closed with its owner: a call on it fails rather than leaking a connection.
    with pytest.raises(grpc.aio.UsageError):
        await send(first)


async def test_runtime_channel_reuses_and_works() -> None:
    async with running("ping-upstream", build_ping) as upstream_server:
        upstream = Upstream(f"127.0.0.1:{upstream_server.port}", insecure=True)
        runtimes: list[serving.Runtime] = []

        def factory(runtime: serving.Runtime) -> Sequence[serving.Service]:
            runtimes.append(runtime)
            return build_ping(runtime)

        async with running("ping", factory):
            (runtime,) = runtimes
            channel = runtime.channel(upstream)
            assert runtime.channel(upstream) is channel
            assert await send(channel, "via runtime") == "via runtime"


class Flaky(ping_pb2_grpc.PingServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then echoes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = {"Send": 0, "SendUpstream": 0}

    async def _answer(self, method: str, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message))

    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return await self._answer("Send", request, context)

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return await self._answer("SendUpstream", request, context)


async def test_unavailable_is_retried_only_for_idempotent_methods(channels: Channels) -> None:
    flaky = Flaky(failures=2)

    def factory(runtime: serving.Runtime) -> Sequence[serving.Service]:
        return [serving.Service("ping.PingService", flaky, ping_pb2_grpc.add_PingServiceServicer_to_server)]

    async with running("flaky", factory) as server:
        upstream = Upstream(f"127.0.0.1:{server.port}", insecure=True)
        stub = ping(channels.open(upstream, idempotent=["ping.PingService/Send"]))
        retried = await stub.Send(ping_pb2.Request(message="again"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as not_retried:
            await stub.SendUpstream(ping_pb2.Request(message="once"), timeout=5)
    assert retried.pong.message == "again"
    assert flaky.calls == {"Send": 3, "SendUpstream": 1}
    assert not_retried.value.code() == grpc.StatusCode.UNAVAILABLE
