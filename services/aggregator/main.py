"""The aggregator's process: PING_ADDR and ROUTEGUIDE_ADDR name its downstreams (host:port, TLS + ID token by
default; UPSTREAM_INSECURE / UPSTREAM_UNAUTHENTICATED for local development)."""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.v1 import aggregator_pb2_grpc
from mesh import ConfigError, Runtime, Service, Upstream, main
from ping import ping_pb2_grpc
from routeguide import route_guide_pb2_grpc
from services.aggregator.servicer import AggregatorServicer
from services.aggregator.survey import MAX_REQUEST_BYTES

SERVICE_NAME = "aggregator.v1.Aggregator"


def _upstream(runtime: Runtime, variable: str) -> Upstream:
    upstream = Upstream.from_env(
        runtime.env,
        variable,
        insecure_var="UPSTREAM_INSECURE",
        unauthenticated_var="UPSTREAM_UNAUTHENTICATED",
    )
    if upstream is None:
        raise ConfigError(
            f"{variable} is not set; set {variable} to the downstream's host:port, e.g. x.a.run.app:443"
        )
    return upstream


def build(runtime: Runtime) -> Sequence[Service]:
    ping = runtime.channel(_upstream(runtime, "PING_ADDR"), idempotent=["ping.PingService/Send"])
    routes = runtime.channel(
        _upstream(runtime, "ROUTEGUIDE_ADDR"),
        idempotent=["routeguide.RouteGuide/GetFeature", "routeguide.RouteGuide/ListFeatures"],
    )
    servicer = AggregatorServicer(
        ping_pb2_grpc.PingServiceStub(ping),  # type: ignore[arg-type]
        route_guide_pb2_grpc.RouteGuideStub(routes),  # type: ignore[arg-type]
    )
    add = aggregator_pb2_grpc.add_AggregatorServicer_to_server
    # A Survey at its limits (survey.py says how it is counted), not gRPC's default 4 MiB.
    return [Service(SERVICE_NAME, servicer, add, max_request_bytes=MAX_REQUEST_BYTES)]


if __name__ == "__main__":
    main("aggregator", build)
