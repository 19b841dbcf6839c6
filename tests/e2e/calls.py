"""Helpers for calling the running mesh as a caller outside Cloud Run does (TLS to the front end, by run.app
name) and reading its traces."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc

from aggregator.v1 import aggregator_pb2_grpc
from localmesh.demo import DemoClient, front_channel
from localmesh.launcher import Mesh
from localmesh.spans import Span
from mesh import tracing
from ping import ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc

FINE = {"OK", "UNSET"}  # a span that recorded no error


def tls_channel(mesh: Mesh, client: DemoClient, service: str) -> grpc.aio.Channel:
    """TLS with the dev CA by `service`'s run.app name and no call credentials (each test sends its own token,
    or none), traced."""
    credentials = grpc.ssl_channel_credentials(client.roots)
    return front_channel(mesh, service, credentials, tracing.client_interceptors(client.provider))


# The generated Stub classes are typed for sync channels; on an aio channel they behave as the AsyncStub types.
def aggregator(channel: grpc.aio.Channel) -> aggregator_pb2_grpc.AggregatorAsyncStub:
    return aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[return-value]


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


def routeguide(channel: grpc.aio.Channel) -> route_guide_pb2_grpc.RouteGuideAsyncStub:
    return route_guide_pb2_grpc.RouteGuideStub(channel)  # type: ignore[return-value]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def features(
    mesh: Mesh, client: DemoClient, area: route_guide_pb2.Rectangle
) -> list[route_guide_pb2.Feature]:
    """What routeguide itself has in `area`, asked as the aggregator's account (routeguide admits no one else:
    services/invokers.yaml)."""
    stub = routeguide(client.channel("routeguide", account=mesh.account("aggregator")))
    return [f async for f in stub.ListFeatures(area, timeout=10)]


def one(spans: Sequence[Span], service: str, kind: str, name: str) -> Span:
    found = [s for s in spans if (s.service, s.kind, s.name) == (service, kind, name)]
    assert len(found) == 1, f"expected one {service} {kind} {name}, got {len(found)} in {describe(spans)}"
    return found[0]


def describe(spans: Sequence[Span]) -> list[tuple[str, str, str, str]]:
    return [(s.service, s.kind, s.name, s.status) for s in spans]


async def wait_span(
    mesh: Mesh, trace_id: str, service: str, kind: str, name: str, timeout: float
) -> Span | None:
    """The finished span, once its process has exported it; None if it has not ended within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for span in mesh.spans.trace(trace_id):
            if (span.service, span.kind, span.name) == (service, kind, name):
                return span
        await asyncio.sleep(0.05)
    return None


def instance_ports(mesh: Mesh, service: str) -> list[int]:
    """The ports of the service's serving instances (what its autoscaler holds)."""
    return [p.port for s, p in mesh.started if s == service and p.alive()]


def pid_listening(port: int) -> int:
    """The process listening on loopback TCP `port` (an instance: a fault is injected into it by signal)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(str(fd.readlink()) in inodes for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
            except OSError:
                continue  # exited meanwhile, or not ours to read
    raise AssertionError(f"no process listens on port {port}")
