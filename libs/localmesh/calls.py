"""The services' call metrics in the local mesh: an OTLP/gRPC metrics receiver, and a table per method.

Each service exports its RED metrics (mesh.metrics) with the standard OTLP exporter, as it exports its spans;
the launcher keeps the latest cumulative `rpc.server.duration` point of each service, method and status code,
and prints calls, errors by code, p50 and p99 (read from the histogram's buckets) for each method.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from mesh.metrics import SERVER_DURATION


@dataclass(frozen=True)
class Series:
    service: str  # the process's service.name
    method: str  # "/package.Service/Method"
    code: str  # gRPC status code name


@dataclass(frozen=True)
class Histogram:
    count: int
    bounds: tuple[float, ...]
    buckets: tuple[int, ...]  # len(bounds) + 1 counts

    def quantile(self, q: float) -> float:
        """The `q` quantile, interpolated inside its bucket (the last bucket: its lower bound)."""
        rank = q * self.count
        seen = 0
        for index, in_bucket in enumerate(self.buckets):
            if in_bucket and seen + in_bucket >= rank:
                low = self.bounds[index - 1] if index > 0 else 0.0
                if index == len(self.bounds):
                    return low
                return low + (self.bounds[index] - low) * (rank - seen) / in_bucket
            seen += in_bucket
        return self.bounds[-1] if self.bounds else 0.0

    def merged(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            return self if self.count >= other.count else other
        return Histogram(
            self.count + other.count, self.bounds, tuple(a + b for a, b in zip(self.buckets, other.buckets))
        )


def _attribute(attributes: Sequence[KeyValue], key: str) -> str | int | None:
    for attribute in attributes:
        if attribute.key == key:
            value = attribute.value
            return value.int_value if value.HasField("int_value") else value.string_value
    return None


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class CallStore:
    """The latest cumulative duration histogram of each series, thread-safe."""

    def __init__(self) -> None:
        self._latest: dict[Series, Histogram] = {}
        self._lock = threading.Lock()

    def add(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        for resource in request.resource_metrics:
            service = str(_attribute(resource.resource.attributes, "service.name") or "?")
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != SERVER_DURATION:
                        continue
                    for point in metric.histogram.data_points:
                        name = f"/{_attribute(point.attributes, 'rpc.service')}/{_attribute(point.attributes, 'rpc.method')}"
                        code = _attribute(point.attributes, "rpc.grpc.status_code")
                        series = Series(
                            service, name, _CODE_NAMES.get(code, str(code)) if isinstance(code, int) else "?"
                        )
                        with self._lock:
                            self._latest[series] = Histogram(
                                point.count, tuple(point.explicit_bounds), tuple(point.bucket_counts)
                            )

    def calls(self) -> dict[Series, Histogram]:
        with self._lock:
            return dict(self._latest)

    async def settled(self, quiet: float, timeout: float) -> dict[Series, Histogram]:
        """The calls once no export has changed them for `quiet` seconds (more than one export interval),
        or when `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = self.calls()
        while loop.time() < deadline:
            await asyncio.sleep(quiet)
            now = self.calls()
            if now == seen:
                return now
            seen = now
        return seen


def table(calls: dict[Series, Histogram]) -> list[str]:
    """One line per service and method: calls, errors by code, p50 and p99 in ms (all codes)."""
    by_method: dict[tuple[str, str], dict[str, Histogram]] = defaultdict(dict)
    for series, histogram in calls.items():
        by_method[(series.service, series.method)][series.code] = histogram
    rows = [("SERVICE", "METHOD", "CALLS", "ERRORS", "P50 MS", "P99 MS")]
    for (service, method), codes in sorted(by_method.items()):
        histograms = list(codes.values())
        total = histograms[0]
        for more in histograms[1:]:
            total = total.merged(more)
        errors = ", ".join(f"{code} {h.count}" for code, h in sorted(codes.items()) if code != "OK") or "-"
        rows.append(
            (
                service,
                method,
                str(total.count),
                errors,
                f"{total.quantile(0.5):.1f}",
                f"{total.quantile(0.99):.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i < 2 or i == 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


class _Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: CallStore) -> None:
        self._store = store

    async def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.aio.ServicerContext
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._store.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def add_receiver(store: CallStore, server: grpc.aio.Server) -> None:
    """The OTLP metrics service on `server` (the launcher's span receiver: one OTLP endpoint for both)."""
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Receiver(store), server)  # type: ignore[no-untyped-call]
