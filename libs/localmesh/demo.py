"""The demo the launcher runs once the mesh is up: a relayed ping, a Survey and a short Tour, each printed with
its result and the trace of the request as a tree. It calls as a caller outside Cloud Run does: over TLS to the
front end, by the service's run.app name, with the developer's ID token (the outside callers' identity, which
may call what services/invokers.yaml lets it: ping and the aggregator)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from localmesh.launcher import Mesh
from localmesh.spans import StoreExporter
from localmesh.trace_tree import render
from mesh import tracing
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2
from services.routeguide.features import builtin_database

Print = Callable[[str], None]
CLIENT = "mesh-demo"


def point(latitude: float, longitude: float) -> route_guide_pb2.Point:
    return route_guide_pb2.Point(latitude=round(latitude * 1e7), longitude=round(longitude * 1e7))


WORLD = route_guide_pb2.Rectangle(lo=point(-90, -180), hi=point(90, 180))


def front_channel(
    mesh: Mesh,
    service: str,
    credentials: grpc.ChannelCredentials,
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A connection to `service` by its run.app name (TLS name and :authority), the socket to the front end."""
    host = mesh.host(service)
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.ssl_target_name_override", host),
        ("grpc.default_authority", f"{host}:443"),
    ]
    return grpc.aio.secure_channel(mesh.front, credentials, options=options, interceptors=interceptors)


class DemoClient:
    """A caller of the mesh as a developer would be: TLS with the dev CA, the developer's ID token, traced."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.provider = TracerProvider(resource=Resource.create({"service.name": CLIENT}))
        self.provider.add_span_processor(SimpleSpanProcessor(StoreExporter(mesh.spans)))
        self._tracer = self.provider.get_tracer("localmesh.demo")
        self.roots = mesh.ca_file.read_bytes()
        self._channels: list[grpc.aio.Channel] = []

    def channel(self, service: str, account: str | None = None) -> grpc.aio.Channel:
        """As the developer, or as `account` (a test playing one of the service's callers)."""
        token = self._mesh.identity.mint(account or self._mesh.developer, self._mesh.audience(service))
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.roots), grpc.access_token_call_credentials(token)
        )
        interceptors = tracing.client_interceptors(self.provider)
        channel = front_channel(self._mesh, service, credentials, interceptors)
        self._channels.append(channel)
        return channel

    @contextlib.contextmanager
    def traced(self, name: str) -> Iterator[str]:
        """A root span around one demo step; yields its trace id."""
        with self._tracer.start_as_current_span(name) as span:
            yield f"{span.get_span_context().trace_id:032x}"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self.provider.shutdown()


async def run(mesh: Mesh, say: Print) -> None:
    client = DemoClient(mesh)
    try:
        await _relayed_ping(mesh, client, say)
        features = await _survey(mesh, client, say)
        await _tour(mesh, client, [f.location for f in features if f.name][:2], say)
    finally:
        await client.close()


async def _show_trace(mesh: Mesh, trace_id: str, services: set[str], say: Print) -> None:
    spans = await mesh.spans.wait_for(trace_id, services=services | {CLIENT}, timeout=5)
    say(render(spans))
    say("")


async def _relayed_ping(mesh: Mesh, client: DemoClient, say: Print) -> None:
    stub = ping_pb2_grpc.PingServiceStub(client.channel("ping"))
    with client.traced("demo: relayed ping") as trace_id:
        reply = await stub.SendUpstream(ping_pb2.Request(message="hello from the demo"), timeout=10)
    received = reply.pong.received_on.ToDatetime().isoformat(timespec="milliseconds")
    say(f"== ping.SendUpstream -> pong #{reply.pong.index} {reply.pong.message!r}, received {received}Z")
    await _show_trace(mesh, trace_id, {"ping", "ping-upstream"}, say)


async def _survey(mesh: Mesh, client: DemoClient, say: Print) -> list[route_guide_pb2.Feature]:
    """Surveys the whole world, walking a route past three places of gRPC's canonical RouteGuide set (what
    routeguide serves unless ROUTEGUIDE_DB says otherwise); returns the features found."""
    stub = aggregator_pb2_grpc.AggregatorStub(client.channel("aggregator"))
    route = [
        route_guide_pb2.Point(latitude=f.latitude, longitude=f.longitude)
        for f in builtin_database().features[:3]
    ]
    request = aggregator_pb2.SurveyRequest(message="survey", area=WORLD, route=route)
    with client.traced("demo: survey") as trace_id:
        reply = await stub.Survey(request, timeout=10)
    summary = reply.route_summary
    say(
        f"== aggregator.Survey -> pong {reply.pong.message!r}, {len(reply.features)} features in the area, "
        f"route: {summary.point_count} points past {summary.feature_count} features, {summary.distance} m"
    )
    for call in reply.calls:
        code = grpc.StatusCode.OK.name if call.code == 0 else str(call.code)
        say(f"   {call.method:<38} {code:<4} {call.latency.ToNanoseconds() / 1e6:7.1f} ms  {call.message}")
    await _show_trace(mesh, trace_id, {"aggregator", "ping", "routeguide"}, say)
    return list(reply.features)


async def _tour(mesh: Mesh, client: DemoClient, places: list[route_guide_pb2.Point], say: Print) -> None:
    stub = aggregator_pb2_grpc.AggregatorStub(client.channel("aggregator"))
    first, second = (places + [route_guide_pb2.Point()] * 2)[:2]
    stops = [(first, "start here"), (second, "halfway"), (first, "back at the start")]

    async def walk() -> AsyncIterator[aggregator_pb2.TourStop]:
        for location, note in stops:
            yield aggregator_pb2.TourStop(location=location, note=note)

    with client.traced("demo: tour") as trace_id:
        updates = [u async for u in stub.Tour(walk(), timeout=10)]
    say(f"== aggregator.Tour -> {len(stops)} stops")
    for update in updates:
        if update.HasField("arrival"):
            name = update.arrival.feature.name or "(nothing here)"
            say(f"   stop {update.arrival.stop}: {name}")
        else:
            say(f"   note from an earlier visit: {update.note.message!r}")
    await _show_trace(mesh, trace_id, {"aggregator", "routeguide"}, say)
