"""Running a service in-process, the way its process would run it, for tests: `async with running(...)`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

from opentelemetry import propagate
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from mesh import metrics, propagation, serving, tracing

NO_REUSEPORT = [("grpc.so_reuseport", 0)]


@contextlib.asynccontextmanager
async def running(
    default_service: str,
    factory: serving.ServiceFactory,
    env: Mapping[str, str] = {},
    *,
    exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> AsyncIterator[serving.RunningServer]:
    """Serve `factory` on a free port with `env` (PORT defaults to 0) until the block ends, then drain.

    Like serving.main, installs the propagators of OTEL_PROPAGATORS; they are process-wide (the gRPC
    instrumentation reads the global propagator), so the innermost `running` block's win until it ends.
    """
    env = {"PORT": "0", **env}
    propagator = propagation.propagator_from_env(env)
    stop = asyncio.Event()
    ready: asyncio.Future[serving.RunningServer] = asyncio.get_running_loop().create_future()
    provider = tracing.provider_from_env(env, default_service, exporters)
    meters = metrics.provider_from_env(env, default_service, metric_readers)
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(propagator)
    try:
        task = asyncio.create_task(
            serving.serve(
                default_service,
                factory,
                env,
                provider=provider,
                stop=stop,
                on_ready=ready.set_result,
                meters=meters,
            )
        )
        done, _ = await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if task in done:  # it failed to start: raise its error
            task.result()
        try:
            yield ready.result()
        finally:
            stop.set()
            await task
    finally:
        propagate.set_global_textmap(previous)
