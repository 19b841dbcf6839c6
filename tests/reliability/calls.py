"""Clients of the services under test: channels, typed stubs, raw method calls, and a steady healthy client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from aggregator.v1 import aggregator_pb2_grpc
from emulators.dev_ca import DevCerts
from mesh.testing import NO_REUSEPORT
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from routeguide.route_guide_pb2 import Point, Rectangle

# A client that sends what the server will refuse, so that the server (not the client) says no.
UNLIMITED = [*NO_REUSEPORT, ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
EOF_ = grpc.aio.EOF  # type: ignore[attr-defined]

WORLD = Rectangle(
    lo=Point(latitude=-900_000_000, longitude=-1_800_000_000),
    hi=Point(latitude=900_000_000, longitude=1_800_000_000),
)

# Every method of the three services, with its kind: (request streaming, response streaming).
METHODS: dict[str, tuple[bool, bool]] = {
    "/ping.PingService/Send": (False, False),
    "/ping.PingService/SendUpstream": (False, False),
    "/routeguide.RouteGuide/GetFeature": (False, False),
    "/routeguide.RouteGuide/ListFeatures": (False, True),
    "/routeguide.RouteGuide/RecordRoute": (True, False),
    "/routeguide.RouteGuide/RouteChat": (True, True),
    "/aggregator.v1.Aggregator/Survey": (False, False),
    "/aggregator.v1.Aggregator/Tour": (True, True),
}


def service_of(method: str) -> str:
    return method[1:].split(".")[0]


def insecure(address: str, options: list[tuple[str, Any]] = NO_REUSEPORT) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=options)


def tls(port: int, certs: DevCerts, token: str | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials, options=NO_REUSEPORT)


# The generated Stub classes are typed for sync channels; on an aio channel they behave as the AsyncStub types.
def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


def routeguide(channel: grpc.aio.Channel) -> route_guide_pb2_grpc.RouteGuideAsyncStub:
    return route_guide_pb2_grpc.RouteGuideStub(channel)  # type: ignore[return-value]


def aggregator(channel: grpc.aio.Channel) -> aggregator_pb2_grpc.AggregatorAsyncStub:
    return aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[return-value]


async def raw_call(
    channel: grpc.aio.Channel,
    method: str,
    payloads: list[bytes],
    *,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 10,
) -> list[bytes]:
    """Calls `method` with serialized (or deliberately broken) messages; the raw replies, or AioRpcError."""
    request_streaming, response_streaming = METHODS[method]
    if not request_streaming:
        assert len(payloads) == 1
        if response_streaming:
            call = channel.unary_stream(method)(payloads[0], metadata=metadata, timeout=timeout)
            return [reply async for reply in call]
        return [await channel.unary_unary(method)(payloads[0], metadata=metadata, timeout=timeout)]

    async def requests() -> AsyncIterator[bytes]:
        for payload in payloads:
            yield payload

    if response_streaming:
        call = channel.stream_stream(method)(requests(), metadata=metadata, timeout=timeout)
        return [reply async for reply in call]
    return [await channel.stream_unary(method)(requests(), metadata=metadata, timeout=timeout)]


@dataclass
class Steady:
    """A healthy client calling throughout a test: every one of its calls must succeed."""

    calls: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class SteadyClient:
    """Runs `call` on its own channel every `interval` seconds until stopped; counts successes and failures."""

    call: Callable[[], Awaitable[object]]
    interval: float = 0.02
    state: Steady = field(default_factory=Steady)
    _task: asyncio.Task[None] | None = None

    def start(self) -> SteadyClient:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                await self.call()
                self.state.calls += 1
            except grpc.aio.AioRpcError as err:
                self.state.errors.append(f"{err.code().name}: {err.details()}")
            await asyncio.sleep(self.interval)

    async def stop(self) -> Steady:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.state


async def steady_calls(stack_ping: str, stack_routeguide: str) -> tuple[SteadyClient, list[grpc.aio.Channel]]:
    """A SteadyClient doing ping.Send and routeguide.GetFeature on channels of its own."""
    channels = [insecure(stack_ping), insecure(stack_routeguide)]
    pinger, guide = ping(channels[0]), routeguide(channels[1])

    async def call() -> None:
        await pinger.Send(ping_pb2.Request(message="steady"), timeout=5)
        await guide.GetFeature(route_guide_pb2.Point(latitude=1, longitude=2), timeout=5)

    return SteadyClient(call).start(), channels
