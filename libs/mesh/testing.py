"""The test kit: a service run in-process the way its process would run it (`async with running(...)`), a
loopback server for servicers under test (`loopback`), and `eventually` for what comes true in a while."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import grpc
from opentelemetry import propagate
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from mesh import metrics, propagation, serving, tracing
from mesh.server import AsyncioModel, ServerChain, ServingModel

# Tests bind port 0 and must never share a port with another test's server (SO_REUSEPORT would let them).
NO_REUSEPORT: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
LOOPBACK = "127.0.0.1"

Adds = Callable[[Any], object]  # e.g. functools.partial(add_PingServiceServicer_to_server, Ping())
Found = TypeVar("Found")


class Loopback(NamedTuple):
    server: Any  # made by `model`
    address: str  # host:port, on 127.0.0.1
    model: ServingModel

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def channel(
        self, *options: tuple[str, Any], interceptors: Sequence[Any] | None = None
    ) -> grpc.aio.Channel:
        """A plaintext channel to the server (no reuseport, and `options`)."""
        return grpc.aio.insecure_channel(
            self.address, options=[*NO_REUSEPORT, *options], interceptors=interceptors
        )

    async def stop(self) -> None:
        """Stopped at once (no grace)."""
        await self.model.stop(self.server, None)


async def start_loopback(
    *adds: Adds,
    chain: ServerChain | None = None,
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    model: type[ServingModel] = AsyncioModel,
) -> Loopback:
    """A started server of `model` on a free loopback port with the services `adds` add (through `chain`, when
    given), plaintext unless `credentials` are given. The caller stops it; `loopback` does so itself."""
    made = model()
    server = made.server([*NO_REUSEPORT, *options])
    if chain is not None:
        server = chain.wrapping(server, made)
    for add in adds:
        add(server)
    if credentials is None:
        port = server.add_insecure_port(f"{LOOPBACK}:0")
    else:
        port = server.add_secure_port(f"{LOOPBACK}:0", credentials)
    await made.start(server)
    return Loopback(server, f"{LOOPBACK}:{port}", made)


@contextlib.asynccontextmanager
async def loopback(
    *adds: Adds,
    chain: ServerChain | None = None,
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    model: type[ServingModel] = AsyncioModel,
) -> AsyncIterator[Loopback]:
    """`start_loopback` for the block, the server stopped (no grace) when it ends."""
    started = await start_loopback(*adds, chain=chain, credentials=credentials, options=options, model=model)
    try:
        yield started
    finally:
        await started.stop()


async def eventually(
    check: Callable[[], Awaitable[Found] | Found],
    *,
    within: float = 10.0,
    every: float = 0.05,
    retrying: tuple[type[BaseException], ...] = (),
    what: str = "the condition",
) -> Found:
    """The first truthy value `check` returns (awaited if it is awaitable), asked every `every` seconds for at
    most `within` seconds; an exception of a `retrying` type counts as "not yet". If it never comes: an
    AssertionError naming `what` and the last such exception."""
    deadline = time.monotonic() + within
    failure: BaseException | None = None
    for _ in range(int(within / every) + 1):
        try:
            found = check()
            if inspect.isawaitable(found):
                found = await found
        except retrying as exc:
            failure = exc
        else:
            if found:
                return cast(Found, found)
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {within} s" + (f" (last: {failure!r})" if failure else ""))


@contextlib.asynccontextmanager
async def running(
    default_service: str,
    factory: serving.ServiceFactory,
    env: Mapping[str, str] = {},
    *,
    exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> AsyncIterator[serving.RunningServer]:
    """Serve `factory` on a free port of loopback with `env` (PORT defaults to 0, BIND_HOST to 127.0.0.1) until
    the block ends, then drain (with no lame duck, as after a Ctrl-C: nothing here health-checks it).

    Like serving.main, installs the propagators of OTEL_PROPAGATORS; they are process-wide (the server and
    client spans read the global propagator), so the innermost `running` block's win until it ends.
    """
    env = {"PORT": "0", "BIND_HOST": LOOPBACK, **env}
    propagator = propagation.propagator_from_env(env)
    stop, hurry = asyncio.Event(), asyncio.Event()
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
                hurry=hurry,
            )
        )
        done, _ = await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if task in done:  # it failed to start: raise its error
            task.result()
        try:
            yield ready.result()
        finally:
            hurry.set()
            stop.set()
            await task
    finally:
        propagate.set_global_textmap(previous)
