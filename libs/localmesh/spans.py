"""Spans from every process of the local mesh, in one place: an OTLP/gRPC trace receiver on loopback.

Each service exports with its standard OTLP exporter (OTEL_TRACES_EXPORTER=otlp); the launcher's own client
spans are added directly. Spans are kept in memory, bounded, and grouped by trace id for printing.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from mesh.testing import NO_REUSEPORT

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}
_SUCCEEDED = {"OK", "UNSET"}


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: str  # "server" | "client" | ...
    trace_id: str  # 32 hex digits
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    status: str  # gRPC status code name when known, else OK/ERROR/UNSET

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class SpanStore:
    """Thread-safe, bounded collection of finished spans."""

    def __init__(self, limit: int = 50_000) -> None:
        self._spans: deque[Span] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, spans: Sequence[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def all(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    async def wait_for(self, trace_id: str, *, services: set[str], timeout: float) -> list[Span]:
        """The trace's spans once it is whole: every service in `services` reported, every parent present, and
        every client span that succeeded has its server span (a callee's span ends before its caller's, but each
        process exports in its own batches, so a leaf can arrive after the rest).

        A trace arrives in pieces; whatever arrived is returned when `timeout` passes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            spans = self.trace(trace_id)
            ids = {s.span_id for s in spans}
            parents = {s.parent_id for s in spans}
            whole = (
                services <= {s.service for s in spans}
                and all(not s.parent_id or s.parent_id in ids for s in spans)
                and all(s.span_id in parents for s in spans if s.kind == "client" and s.status in _SUCCEEDED)
            )
            if whole or loop.time() > deadline:
                return spans
            await asyncio.sleep(0.05)


def _status(code: int, attributes: dict[str, object]) -> str:
    grpc_code = attributes.get("rpc.grpc.status_code")
    if isinstance(grpc_code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == grpc_code), str(grpc_code))
    return _CODES.get(code, str(code))


def from_otlp(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        service = next(
            (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "?"
        )
        for scope in resource_spans.scope_spans:
            for s in scope.spans:
                attributes: dict[str, object] = {
                    a.key: a.value.int_value or a.value.string_value for a in s.attributes
                }
                spans.append(
                    Span(
                        service=service,
                        name=s.name,
                        kind=_KINDS.get(s.kind, "?"),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        status=_status(s.status.code, attributes),
                    )
                )
    return spans


def from_sdk(span: ReadableSpan) -> Span:
    context = span.context
    attributes = dict(span.attributes or {})
    code = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}[span.status.status_code]
    return Span(
        service=str(span.resource.attributes.get("service.name", "?")),
        name=span.name,
        kind=_KINDS.get({SpanKind.SERVER: 2, SpanKind.CLIENT: 3}.get(span.kind, 1), "?"),
        trace_id=f"{context.trace_id:032x}" if context else "",
        span_id=f"{context.span_id:016x}" if context else "",
        parent_id=f"{span.parent.span_id:016x}" if span.parent else "",
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        status=_status(code, attributes),  # type: ignore[arg-type]
    )


class StoreExporter(SpanExporter):
    """Puts the launcher's own spans in the store, beside the services' spans."""

    def __init__(self, store: SpanStore) -> None:
        self._store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._store.add([from_sdk(s) for s in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self._store = store

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store.add(from_otlp(request))
        return trace_service_pb2.ExportTraceServiceResponse()


async def start_receiver(
    store: SpanStore, *more: Callable[[grpc.aio.Server], None]
) -> tuple[grpc.aio.Server, int]:
    """An OTLP/gRPC trace receiver on 127.0.0.1 (and what `more` adds to it); returns the server and its port."""
    server = grpc.aio.server(options=NO_REUSEPORT)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(store), server)  # type: ignore[no-untyped-call]
    for add in more:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
