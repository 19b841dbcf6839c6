"""RED metrics through real servers: after known calls (failing ones among them) the points carry the right
counts, codes and attributes; health checks record nothing; outgoing calls are measured by their caller."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from mesh.metrics import provider_from_env
from mesh.settings import ConfigError
from mesh.testing import NO_REUSEPORT, running
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.aggregator.main import build as build_aggregator
from services.ping.main import build as build_ping
from services.routeguide.main import build as build_routeguide

Point = route_guide_pb2.Point
BERKSHIRE = Point(latitude=409146138, longitude=-746188906)
AREA = route_guide_pb2.Rectangle(
    lo=Point(latitude=400000000, longitude=-750000000), hi=Point(latitude=420000000, longitude=-730000000)
)
OK, INVALID_ARGUMENT = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, str, int], HistogramDataPoint]:
    """(service, method, status code) -> the histogram point of metric `name`."""
    found: dict[tuple[str, str, int], HistogramDataPoint] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    assert isinstance(point, HistogramDataPoint)
                    a: Any = point.attributes
                    assert a["rpc.system"] == "grpc"
                    found[(a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"])] = point
    return found


async def test_served_calls_are_counted_by_method_and_code_and_probes_are_not() -> None:
    reader = InMemoryMetricReader()
    async with running("routeguide", build_routeguide, metric_readers=[reader]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=NO_REUSEPORT) as channel:
            routes: Any = route_guide_pb2_grpc.RouteGuideStub(channel)
            for _ in range(3):
                assert (await routes.GetFeature(BERKSHIRE, timeout=5)).name
            with pytest.raises(grpc.aio.AioRpcError):
                await routes.GetFeature(Point(latitude=910000000), timeout=5)
            listed = [f async for f in routes.ListFeatures(AREA, timeout=5)]
            summary = await routes.RecordRoute(iter([BERKSHIRE, BERKSHIRE, BERKSHIRE]), timeout=5)
            health: Any = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        durations = points(reader, "rpc.server.duration")
        received = points(reader, "rpc.server.requests_per_rpc")
        sent = points(reader, "rpc.server.responses_per_rpc")
    service = "routeguide.RouteGuide"
    assert {key: p.count for key, p in durations.items()} == {
        (service, "GetFeature", OK): 3,
        (service, "GetFeature", INVALID_ARGUMENT): 1,
        (service, "ListFeatures", OK): 1,
        (service, "RecordRoute", OK): 1,
    }
    assert all(p.sum > 0 and p.min >= 0 for p in durations.values())
    # Messages per stream, for the streaming calls only.
    assert set(received) == set(sent) == {(service, "ListFeatures", OK), (service, "RecordRoute", OK)}
    assert received[(service, "ListFeatures", OK)].sum == 1 and sent[(service, "ListFeatures", OK)].sum == 100
    assert len(listed) == 100 and summary.point_count == 3
    assert received[(service, "RecordRoute", OK)].sum == 3 and sent[(service, "RecordRoute", OK)].sum == 1


async def _surveys(reader: InMemoryMetricReader, ping_port: int, routes_port: int, count: int) -> None:
    """`count` Surveys through an aggregator (recording into `reader`) that calls ping and routeguide there."""
    env = {
        "PING_ADDR": f"127.0.0.1:{ping_port}",
        "ROUTEGUIDE_ADDR": f"127.0.0.1:{routes_port}",
        "UPSTREAM_INSECURE": "1",
    }
    async with running("aggregator", build_aggregator, env, metric_readers=[reader]) as aggregator:
        address = f"127.0.0.1:{aggregator.port}"
        async with grpc.aio.insecure_channel(address, options=NO_REUSEPORT) as channel:
            stub: Any = aggregator_pb2_grpc.AggregatorStub(channel)
            request = aggregator_pb2.SurveyRequest(message="m", area=AREA, route=[BERKSHIRE])
            for _ in range(count):
                await stub.Survey(request, timeout=10)


def _counts(reader: InMemoryMetricReader, name: str) -> Counter[tuple[str, str, int]]:
    return Counter({key: p.count for key, p in points(reader, name).items()})


async def test_outgoing_calls_are_measured_by_the_caller() -> None:
    reader = InMemoryMetricReader()
    async with running("ping", build_ping) as ping, running("routeguide", build_routeguide) as routes:
        await _surveys(reader, ping.port, routes.port, 2)
    assert _counts(reader, "rpc.client.duration") == {
        ("ping.PingService", "Send", OK): 2,
        ("routeguide.RouteGuide", "ListFeatures", OK): 2,
        ("routeguide.RouteGuide", "RecordRoute", OK): 2,
    }
    assert _counts(reader, "rpc.server.duration") == {("aggregator.v1.Aggregator", "Survey", OK): 2}


async def test_an_outgoing_call_that_fails_is_counted_with_its_code() -> None:
    reader = InMemoryMetricReader()
    async with running("routeguide", build_routeguide) as routes:
        port = routes.port
    # routeguide has stopped: the aggregator's calls to it fail, and Survey answers with what it has.
    async with running("ping", build_ping) as ping:
        await _surveys(reader, ping.port, port, 1)
    client = _counts(reader, "rpc.client.duration")
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    assert client[("ping.PingService", "Send", OK)] == 1
    assert client[("routeguide.RouteGuide", "ListFeatures", unavailable)] == 1


def test_an_unknown_exporter_stops_start_up_naming_the_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"^OTEL_METRICS_EXPORTER has unknown exporter 'prometheus'; use none"
    ):
        provider_from_env({"OTEL_METRICS_EXPORTER": "prometheus"}, "ping")
