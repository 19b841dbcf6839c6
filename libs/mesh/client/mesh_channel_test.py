"""MeshChannel: calls made directly and calls that wait for a token share one connection; a sampled call made
directly still gets its CLIENT span, ended with the call's outcome."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mesh.client import ClientChain
from mesh.client._channels import MeshChannel
from mesh.testing import NO_REUSEPORT, loopback
from ping import ping_pb2, ping_pb2_grpc


class Peer(ping_pb2_grpc.PingServiceServicer):
    """Send answers with the caller's address; SendUpstream refuses."""

    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(message=context.peer()))

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.NOT_FOUND, "nothing upstream")
        raise AssertionError("unreachable")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with loopback(functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, Peer())) as served:
        yield served.port


def mesh_channel(port: int, chain: ClientChain) -> MeshChannel:
    return MeshChannel(
        lambda interceptors: grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=NO_REUSEPORT, interceptors=interceptors
        ),
        chain,
    )


async def test_direct_and_waiting_calls_share_one_connection(port: int) -> None:
    channel = mesh_channel(port, ClientChain())
    direct: Any = ping_pb2_grpc.PingServiceStub(channel)
    waiting: Any = ping_pb2_grpc.PingServiceStub(channel._waiting())  # the token-wait path
    first = await direct.Send(ping_pb2.Request(), timeout=5)
    second = await waiting.Send(ping_pb2.Request(), timeout=5)
    await channel.close()
    assert first.pong.message.startswith("ipv4:127.0.0.1:")
    assert first.pong.message == second.pong.message  # the same client port: one connection


async def test_a_sampled_direct_call_ends_its_client_span_with_the_outcome(port: int) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()  # every root call sampled
    provider.add_span_processor(SimpleSpanProcessor(spans))
    channel = mesh_channel(port, ClientChain(provider))
    stub: Any = ping_pb2_grpc.PingServiceStub(channel)
    await stub.Send(ping_pb2.Request(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendUpstream(ping_pb2.Request(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await channel.close()
    for _ in range(200):  # the spans end from the calls' done callbacks, on the loop: wait (at most 2 s)
        ended = {s.name: s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT}
        if len(ended) == 2:
            break
        await asyncio.sleep(0.01)
    ok, failed = ended["/ping.PingService/Send"], ended["/ping.PingService/SendUpstream"]
    assert ok.attributes is not None and ok.attributes["rpc.grpc.status_code"] == 0
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.attributes is not None and failed.attributes["rpc.grpc.status_code"] == 5
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "nothing upstream"
