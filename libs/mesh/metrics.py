"""RED metrics of every call, served and outgoing: OpenTelemetry's RPC semantic conventions on its SDK.

Why these names and not gRPC's own (`grpc.server.call.duration`, from grpcio-observability): the chains in
mesh.server._chain and mesh.client's ClientChain already know each call's method, outcome and duration, so
recording there costs one histogram point a call, where the plugin would add a second interception layer
inside gRPC's C core; and `rpc.server.duration` / `rpc.client.duration` are what OpenTelemetry's own gRPC instrumentation
emits, so dashboards built for it read ours.

- `rpc.server.duration`, `rpc.client.duration` (ms): one point per call, with `rpc.system`, `rpc.service`,
  `rpc.method` and `rpc.grpc.status_code`; the Cloud Run service is the resource's `service.name`. The count
  of the histogram is the call rate, the points with a code other than 0 are the errors.
- `rpc.server.requests_per_rpc`, `rpc.server.responses_per_rpc`: messages per served stream (streaming
  calls only).
- Probes and tooling (health, reflection) are not recorded, as they are not traced (mesh.server._spans).

OTEL_METRICS_EXPORTER = none (default) | console | otlp | gcp_monitoring (Cloud Monitoring), comma-separated;
OTEL_METRIC_EXPORT_INTERVAL (ms) and OTEL_EXPORTER_OTLP_* are read by the SDK and the exporter themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from opentelemetry.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from mesh.probes import rpc_attributes
from mesh.resources import resource_from_env
from mesh.settings import ConfigError, Env, names

SCOPE = "mesh.metrics"
SERVER_DURATION = "rpc.server.duration"
CLIENT_DURATION = "rpc.client.duration"
SERVER_REQUESTS = "rpc.server.requests_per_rpc"
SERVER_RESPONSES = "rpc.server.responses_per_rpc"
# Milliseconds: OpenTelemetry's recommended RPC buckets, with finer ones below 5 ms, where a mesh's unary
# calls are, so that a p50 read from the buckets means something.
DURATION_BUCKETS_MS = (
    0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0,
    1000.0, 2500.0, 5000.0, 7500.0, 10000.0, 60000.0,
)  # fmt: skip
MESSAGE_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 10000.0)


def _exporter(name: str) -> MetricExporter:
    # Imported on demand, as the span exporters are: each pulls in its own client stack.
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    if name == "gcp_monitoring":
        from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter

        return CloudMonitoringMetricsExporter()  # type: ignore[no-any-return]
    raise ConfigError(
        f"OTEL_METRICS_EXPORTER has unknown exporter {name!r}; use none, console, otlp or gcp_monitoring "
        "(comma-separated)"
    )


def provider_from_env(
    env: Env, service: str, readers: Sequence[MetricReader] = ()
) -> SdkMeterProvider | None:
    """A meter provider for `service` exporting periodically to the configured exporters (and `readers`);
    None when nothing would read the metrics, so that calls record none (and pay nothing for them)."""
    chosen = [n for n in names(env, "OTEL_METRICS_EXPORTER", "none") if n != "none"]
    periodic = [PeriodicExportingMetricReader(_exporter(n)) for n in chosen]
    if not periodic and not readers:
        return None
    views = [
        View(
            instrument_name="rpc.*.duration",
            aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_MS),
        ),
        View(
            instrument_name="rpc.*_per_rpc", aggregation=ExplicitBucketHistogramAggregation(MESSAGE_BUCKETS)
        ),
    ]
    return SdkMeterProvider(
        metric_readers=[*periodic, *readers], resource=resource_from_env(env, service), views=views
    )


class Counts(Protocol):
    """The messages a streaming call received and sent (what the server's handler wrappers count)."""

    received: int
    sent: int


class MethodMetrics:
    """What one method's calls record: made once per method, a cached attribute set per status code."""

    __slots__ = ("_duration", "_requests", "_responses", "_static", "_by_code")

    def __init__(
        self,
        attributes: dict[str, str],
        duration: Histogram,
        requests: Histogram | None,
        responses: Histogram | None,
    ) -> None:
        self._duration, self._requests, self._responses = duration, requests, responses
        self._static = attributes  # the method's (mesh.probes.rpc_attributes)
        self._by_code: dict[int, dict[str, Any]] = {}

    def record(self, started: float, code: grpc.StatusCode, messages: Counts | None = None) -> None:
        """One call that began at `started` (time.perf_counter) and ended now with `code`; `messages` for a
        streaming call."""
        number = code.value[0]
        attributes = self._by_code.get(number)
        if attributes is None:
            attributes = self._by_code[number] = {**self._static, "rpc.grpc.status_code": number}
        self._duration.record((time.perf_counter() - started) * 1000.0, attributes)
        if messages is not None and self._requests is not None and self._responses is not None:
            self._requests.record(messages.received, attributes)
            self._responses.record(messages.sent, attributes)


class RpcMetrics:
    """The instruments of one side (server or client) of a process; `method(name)` per method, or None for
    the untracked services."""

    def __init__(self, provider: MeterProvider, side: str) -> None:
        meter = provider.get_meter(SCOPE)
        self._duration = meter.create_histogram(
            f"rpc.{side}.duration", unit="ms", description=f"Duration of {side}-side gRPC calls"
        )
        self._requests: Histogram | None = None
        self._responses: Histogram | None = None
        if side == "server":
            self._requests = meter.create_histogram(
                SERVER_REQUESTS, unit="{count}", description="Messages received per served stream"
            )
            self._responses = meter.create_histogram(
                SERVER_RESPONSES, unit="{count}", description="Messages sent per served stream"
            )
        self._methods: dict[str | bytes, MethodMetrics | None] = {}

    def method(self, method: str | bytes) -> MethodMetrics | None:
        if method not in self._methods:
            attributes = rpc_attributes(method)
            tracked = None
            if attributes is not None:
                tracked = MethodMetrics(attributes, self._duration, self._requests, self._responses)
            if len(self._methods) < 10_000:  # method names can come from callers: bounded
                self._methods[method] = tracked
            return tracked
        return self._methods[method]
