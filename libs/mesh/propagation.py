"""Trace context on the wire, from OTEL_PROPAGATORS: tracecontext (W3C traceparent), baggage, gcp_trace (Cloud
Run's x-cloud-trace-context), in any combination; default tracecontext,baggage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.settings import ConfigError, Env, names

# Both sides' spans keep the instrumentation scope of opentelemetry-instrumentation-grpc, so span queries
# written for it keep working.
SCOPE = "opentelemetry.instrumentation.grpc"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"


def _cloud_trace_propagator() -> TextMapPropagator:
    from opentelemetry.propagators.cloud_trace_propagator import CloudTraceFormatPropagator

    return CloudTraceFormatPropagator()  # type: ignore[no-any-return]


PROPAGATORS: dict[str, Callable[[], TextMapPropagator]] = {
    "tracecontext": TraceContextTextMapPropagator,
    "baggage": W3CBaggagePropagator,
    "gcp_trace": _cloud_trace_propagator,
}


def propagator_from_env(env: Env) -> TextMapPropagator:
    configured = names(env, "OTEL_PROPAGATORS", "tracecontext,baggage")
    unknown = [n for n in configured if n not in PROPAGATORS and n != "none"]
    if unknown:
        raise ConfigError(
            f"OTEL_PROPAGATORS has unknown propagator {unknown[0]!r}; use tracecontext, baggage, gcp_trace or none"
        )
    chosen = [n for n in configured if n != "none"]
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


def traceparent_decides(textmap: TextMapPropagator) -> bool:
    """Whether, with `textmap`, a valid W3C traceparent decides a call's trace context whenever no tracestate
    or baggage header comes with it: tracecontext is the only trace format, or the first one read."""
    # The propagators' own lists: private, and read only to choose the fast path (any doubt: the slow one).
    parts = textmap._propagators if type(textmap) is CompositePropagator else [textmap]
    formats = [p for p in parts if not isinstance(p, W3CBaggagePropagator)]
    if len(formats) != 1:
        return False  # several formats, each overriding the one before: the last found wins
    first = formats[0]._propagators[0] if isinstance(formats[0], FirstTraceFormat) else formats[0]
    return type(first) is TraceContextTextMapPropagator


def drops_unsampled_parents(provider: trace.TracerProvider, *, remote: bool) -> bool:
    """Whether the provider's sampler drops every child of an unsampled parent (remote: from the caller;
    else: local), as the standard parent-based samplers do; then such a child needs no sampler call."""
    sampler = provider.sampler if isinstance(provider, TracerProvider) else None
    if not isinstance(sampler, ParentBased):
        return False
    # ParentBased has no public accessor for its delegates.
    delegate = sampler._remote_parent_not_sampled if remote else sampler._local_parent_not_sampled
    return delegate is ALWAYS_OFF
