"""The tracer provider from the standard OTEL_* variables, and trace context for a client that is not a service.

The spans themselves are made by mesh.server._spans and mesh.client, inside the server and client chains.

OTEL_SERVICE_NAME (default: the Cloud Run service name), OTEL_TRACES_SAMPLER[_ARG] (read by the SDK itself),
OTEL_TRACES_EXPORTER = none (default) | console | otlp | gcp_trace, OTEL_PROPAGATORS = tracecontext,baggage
(default) | gcp_trace (Cloud Run's x-cloud-trace-context) in any combination. Health checks and reflection are
not traced: probes would drown the real requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from mesh.client import ClientChain
from mesh.resources import resource_from_env
from mesh.settings import ConfigError, Env, names


def _exporter(name: str) -> SpanExporter:
    # Imported on demand: each exporter pulls in its own client stack, which costs start-up time.
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint etc. from OTEL_EXPORTER_OTLP_*
    if name == "gcp_trace":
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

        return CloudTraceSpanExporter()  # type: ignore[no-any-return]
    raise ConfigError(
        f"OTEL_TRACES_EXPORTER has unknown exporter {name!r}; use none, console, otlp or gcp_trace (comma-separated)"
    )


def provider_from_env(env: Env, service: str, exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """A tracer provider for `service`, exporting in the background to the configured exporters (and `exporters`)."""
    provider = TracerProvider(resource=resource_from_env(env, service))
    chosen = [n for n in names(env, "OTEL_TRACES_EXPORTER", "none") if n != "none"]
    for exporter in [*(_exporter(n) for n in chosen), *exporters]:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def client_interceptors(provider: trace.TracerProvider) -> list[grpc.aio.ClientInterceptor]:
    """Trace context (and CLIENT spans) on a channel of a client that is not a service, e.g. a test's."""
    return ClientChain(provider).interceptors()
