"""The server bootstrap, in-process on port 0: h2c by default, TLS from TLS_CERT_FILE/TLS_KEY_FILE, and the
health and reflection services every service gets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from emulators.dev_ca import ensure_dev_certs
from mesh import ServiceFactory
from mesh.testing import NO_REUSEPORT, running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build as build_ping
from services.routeguide.main import build as build_routeguide

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


def plaintext(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT)


async def test_serves_h2c_by_default() -> None:
    async with running("ping", build_ping) as server:
        async with plaintext(server.port) as channel:
            reply = await ping(channel).Send(ping_pb2.Request(message="h2c"), timeout=5)
    assert reply.pong.message == "h2c"


async def test_terminates_tls_when_cert_and_key_are_set(tmp_path: Path) -> None:
    certs = ensure_dev_certs(tmp_path)
    env = {"TLS_CERT_FILE": str(certs.server_cert), "TLS_KEY_FILE": str(certs.server_key)}
    async with running("ping", build_ping, env) as server:
        tls = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", tls, options=NO_REUSEPORT) as channel:
            reply = await ping(channel).Send(ping_pb2.Request(message="tls"), timeout=5)
        # A plaintext client cannot talk to the TLS port.
        async with plaintext(server.port) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ping(channel).Send(ping_pb2.Request(message="h2c"), timeout=5)
    assert reply.pong.message == "tls"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "name, build, services",
    [("ping", build_ping, ["ping.PingService"]), ("routeguide", build_routeguide, ["routeguide.RouteGuide"])],
)
async def test_health_answers_for_the_server_and_each_service(
    name: str, build: ServiceFactory, services: list[str]
) -> None:
    async with running(name, build) as server:
        async with plaintext(server.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {
                service: (
                    await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                ).status
                for service in ["", *services]
            }
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
    assert statuses == {service: SERVING for service in ["", *services]}
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_streams_the_status_and_turns_not_serving_on_stop() -> None:
    async with running("ping", build_ping) as server:
        async with plaintext(server.port) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            first = await asyncio.wait_for(watch.read(), 5)
            await server.not_serving()  # what RunningServer.stop does first
            second = await asyncio.wait_for(watch.read(), 5)
            watch.cancel()
    assert first.status == SERVING
    assert second.status == NOT_SERVING


async def reflected(
    name: str, build: ServiceFactory, request: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """The replies of service `name`'s reflection to `request`."""
    async with running(name, build) as server:
        async with plaintext(server.port) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            return [reply async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5)]


async def test_reflection_lists_the_services() -> None:
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = await reflected("routeguide", build_routeguide, listing)
    assert len(replies) == 1
    names = {service.name for service in replies[0].list_services_response.service}
    assert names == {
        "routeguide.RouteGuide",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_describes_a_service_by_symbol() -> None:
    by_symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="ping.PingService")
    replies = await reflected("ping", build_ping, by_symbol)
    assert len(replies) == 1
    assert replies[0].file_descriptor_response.file_descriptor_proto  # the descriptor of ping.proto


async def test_a_second_server_cannot_take_the_same_port() -> None:
    # SO_REUSEPORT off: two revisions on one port would silently split the traffic.
    async with running("ping", build_ping) as first:
        with pytest.raises(RuntimeError):
            async with running("ping", build_ping, {"PORT": str(first.port)}):
                pass
