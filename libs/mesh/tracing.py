"""OpenTelemetry from the standard OTEL_* variables, and the gRPC interceptors that make one trace per request.

OTEL_SERVICE_NAME (default: the Cloud Run service name), OTEL_TRACES_SAMPLER[_ARG] (read by the SDK itself),
OTEL_TRACES_EXPORTER = none (default) | console | otlp | gcp_trace, OTEL_PROPAGATORS = tracecontext,baggage
(default) | gcp_trace (Cloud Run's x-cloud-trace-context) in any combination. Health checks and reflection are
not traced: probes would drown the real requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh import client_spans
from mesh.settings import ConfigError, Env, text


def _cloud_trace_propagator() -> TextMapPropagator:
    from opentelemetry.propagators.cloud_trace_propagator import CloudTraceFormatPropagator

    return CloudTraceFormatPropagator()  # type: ignore[no-any-return]


PROPAGATORS: dict[str, Callable[[], TextMapPropagator]] = {
    "tracecontext": TraceContextTextMapPropagator,
    "baggage": W3CBaggagePropagator,
    "gcp_trace": _cloud_trace_propagator,
}


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


def _names(env: Env, name: str, default: str) -> list[str]:
    return [item.strip() for item in (text(env, name, default) or default).split(",") if item.strip()]


def propagator_from_env(env: Env) -> TextMapPropagator:
    names = _names(env, "OTEL_PROPAGATORS", "tracecontext,baggage")
    unknown = [n for n in names if n not in PROPAGATORS and n != "none"]
    if unknown:
        raise ConfigError(
            f"OTEL_PROPAGATORS has unknown propagator {unknown[0]!r}; use tracecontext, baggage, gcp_trace or none"
        )
    chosen = [n for n in names if n != "none"]
    trace_formats = [n for n in chosen if n in _TRACE_FORMATS]
    if len(trace_formats) < 2:
        return CompositePropagator([PROPAGATORS[n]() for n in chosen])
    # Cloud Run sends the same trace in traceparent and x-cloud-trace-context: read the first format found
    # (in the configured order) instead of parsing both on every call; inject them all.
    first = FirstTraceFormat([PROPAGATORS[n]() for n in trace_formats])
    others = [PROPAGATORS[n]() for n in chosen if n not in _TRACE_FORMATS]
    return CompositePropagator([first, *others])


_TRACE_FORMATS = ("tracecontext", "gcp_trace")


class FirstTraceFormat(CompositePropagator):
    """Trace context in several formats: extracted from the first that holds a valid one, injected in all."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        for propagator in self._propagators:
            found = propagator.extract(carrier, context, getter=getter)
            if trace.get_current_span(found).get_span_context().is_valid:
                return found
        return context if context is not None else Context()


def provider_from_env(env: Env, service: str, exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """A tracer provider for `service`, exporting in the background to the configured exporters (and `exporters`)."""
    attributes: dict[str, Any] = {"service.name": text(env, "OTEL_SERVICE_NAME", service)}
    if revision := text(env, "K_REVISION"):
        attributes["service.version"] = revision
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [n for n in _names(env, "OTEL_TRACES_EXPORTER", "none") if n != "none"]
    for exporter in [*(_exporter(n) for n in names), *exporters]:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def install(env: Env, service: str) -> TracerProvider:
    """Process-wide set-up for a service: the global propagator and tracer provider."""
    propagate.set_global_textmap(propagator_from_env(env))
    provider = provider_from_env(env, service)
    trace.set_tracer_provider(provider)
    return provider


def client_interceptors(provider: trace.TracerProvider) -> list[grpc.aio.ClientInterceptor]:
    return client_spans.client_interceptors(provider)
