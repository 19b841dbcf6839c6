"""The one way in: a service's process, from environment to drained shutdown.

`main("ping", factory)` reads the settings, configures logging and tracing, builds the service's servicers
through `factory(runtime)`, serves them on $PORT of $BIND_HOST (every interface unless set; h2c, or TLS when
TLS_CERT_FILE/TLS_KEY_FILE are set) with health and reflection, on the serving model their servicers are
written for (mesh.server.AsyncioModel for coroutines, ThreadsModel for functions: BENCHMARKS.md says which
service uses which, and why), and on SIGTERM drains (mesh.server's Drain): health NOT_SERVING at once, every call
still served for the lame duck, then new calls refused with UNAVAILABLE, in-flight calls given the grace
period, spans flushed, exit 0. SIGINT (a developer's Ctrl-C: no front end to warn) skips the lame duck. With
WORKER_PROCESSES above 1 (default: the container's CPU quota), the process supervises that many such servers
on one port instead (mesh.workers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from mesh import logs, metrics, propagation, tracing, workers
from mesh.client import MAX_MESSAGE_BYTES, Channels, IdTokens
from mesh.server import AsyncioModel, Drain, Drained, ServerChain, ServingModel, Threads, TokenVerifier
from mesh.settings import (
    ALL_INTERFACES,
    AuthSettings,
    CallSettings,
    ConfigError,
    Env,
    Keepalive,
    ServerSettings,
    Upstream,
    log_level,
    text,
)

log = logging.getLogger("mesh.serving")

# Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; gRPC's default is
# unbounded): one connection can no longer hold all of MAX_CONCURRENT_RPCS (1000 by default). Above what the
# mesh's own busiest caller needs on its one channel: the aggregator at containerConcurrency 250, each call
# with two streams open to routeguide. A client past the bound waits for a stream (gRPC queues it), it is not
# refused.
MAX_STREAMS_PER_CONNECTION = 512

SERVER_OPTIONS: list[tuple[str, int]] = [
    # A second server on the same port must fail, not silently share it; only the workers of one instance
    # share theirs (mesh.workers), on purpose.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Close connections after a while so clients re-resolve and spread over instances added by scale-out;
    # the grace lets a stream run out its Cloud Run request timeout.
    ("grpc.max_connection_age_ms", 10 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60 * 60_000),
]


# Pings that come too early (see keepalive_policy) a connection may send before it is told GOAWAY
# ENHANCE_YOUR_CALM "too_many_pings": gRPC's default, stated because the bound on a PING flood rests on it (0
# would mean no bound). gRPC forgives the strikes whenever the server sends headers, data or a window update,
# so a caller whose calls are answered never collects them. The bound does not close a connection whose flood
# goes on: gRPC closes it only once its writes go idle, and the flood's PING ACKs keep them busy; the front
# end (Cloud Run's, or Envoy here) is what ends such a flood (RELIABILITY.md, "PING flood").
MAX_PING_STRIKES = 2


def keepalive_policy(keepalive: Keepalive) -> list[tuple[str, int]]:
    """What the server accepts from its callers' keepalive (mesh.client's connection options): pings on
    idle connections, and pings twice as often as they are sent (every 10 s at least, for callers outside the
    mesh), so that no caller with the same settings collects the ping strikes that end in GOAWAY
    "too_many_pings"; a caller that pings faster is told so at its third early ping."""
    interval = min(10.0, keepalive.time / 2)
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", max(1, round(interval * 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


# How a servicer is written, and so how it is served (mesh.server's AsyncioModel or ThreadsModel).
Model = type[ServingModel]


@dataclass(frozen=True)
class Service:
    """A servicer and how to add it, under its full service name (e.g. "ping.PingService"), the serving model
    it is written for, and the largest request message its contract needs: the server takes in no larger
    message (gRPC answers RESOURCE_EXHAUSTED), so each call of a caller with no token yet costs at most that
    much."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]
    max_request_bytes: int = MAX_MESSAGE_BYTES
    model: Model = AsyncioModel


class Runtime:
    """What lives as long as the process, handed to a service's factory: its environment and its channels."""

    def __init__(
        self,
        name: str,
        env: Env,
        provider: trace.TracerProvider,
        calls: CallSettings,
        id_tokens: IdTokens | None,
        meters: MeterProvider | None = None,
    ) -> None:
        self.name, self.env, self.provider, self.meters = name, env, provider, meters
        self._id_tokens = id_tokens
        self._channels = Channels(id_tokens, provider, calls=calls, meters=meters)

    def channel(self, upstream: Upstream, *, idempotent: Sequence[str] = ()) -> grpc.aio.Channel:
        return self._channels.open(upstream, idempotent=idempotent)

    def threads(self) -> Threads:
        """How a servicer of the threads model awaits a call on one of these channels (`Threads.run`)."""
        return Threads(asyncio.get_running_loop())

    async def close(self) -> None:
        await self._channels.close()
        if self._id_tokens is not None:
            self._id_tokens.close()
        if isinstance(self.provider, TracerProvider):
            # Export what is buffered; bounded, because Cloud Run kills the instance 10 s after SIGTERM.
            await asyncio.to_thread(self.provider.force_flush, 1500)
            await asyncio.to_thread(self.provider.shutdown)
        if isinstance(self.meters, MeterProvider):
            # The last points too (the calls of the drain among them), within the same bound.
            await asyncio.to_thread(self.meters.force_flush, 1500)
            await asyncio.to_thread(self.meters.shutdown, 1500)


ServiceFactory = Callable[[Runtime], Sequence[Service]]


class RunningServer:
    def __init__(
        self, server: Any, port: int, health_servicer: Any, model: ServingModel, drain: Drain | None = None
    ) -> None:
        self.server = server  # made by `model`
        self.port = port
        self.health = health_servicer
        self.model = model
        self.drain = drain  # the chain's (mesh.server.Drain), when the server has one

    async def not_serving(self) -> None:
        """Every service NOT_SERVING: probes and load balancers stop sending."""
        await self.model.not_serving(self.health)

    async def stop(self, grace: float, lame_duck: float = 0.0) -> Drained | None:
        """NOT_SERVING first, every call still served for `lame_duck` seconds, then in-flight calls drained
        within `grace` seconds (mesh.server.Drain); what the drain did (None without a chain to count calls).
        """
        await self.not_serving()
        await asyncio.sleep(lame_duck)
        if self.drain is None:
            await self.model.stop(self.server, grace)
            return None
        return await self.drain.run(lambda seconds: self.model.stop(self.server, seconds), grace)


def _bind(server: Any, settings: ServerSettings) -> int:
    credentials = None
    if settings.tls_cert_file and settings.tls_key_file:
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())]
        )
    host = settings.bind_host
    for candidate in (host, "0.0.0.0") if host == ALL_INTERFACES else (host,):  # hosts without IPv6 fall back
        address = f"[{candidate}]:{settings.port}" if ":" in candidate else f"{candidate}:{settings.port}"
        try:
            if credentials:
                return server.add_secure_port(address, credentials)
            return server.add_insecure_port(address)
        except RuntimeError:
            if candidate != ALL_INTERFACES:
                raise
    raise AssertionError("unreachable")


async def start(
    services: Sequence[Service],
    settings: ServerSettings,
    *,
    chain: ServerChain | None = None,
    keepalive: Keepalive = Keepalive(),
) -> RunningServer:
    # One server per process, so one receive limit: the largest its services need (health and reflection
    # requests are a few bytes).
    max_request = max((s.max_request_bytes for s in services), default=MAX_MESSAGE_BYTES)
    options = {
        **dict(SERVER_OPTIONS),
        "grpc.so_reuseport": int(settings.share_port),
        "grpc.max_receive_message_length": max_request,
    }
    server_options = [*options.items(), *keepalive_policy(keepalive)]
    model = _model(services)(settings.server_threads)
    server = model.server(server_options, settings.max_concurrent_rpcs)
    health_servicer = model.health()
    if chain is not None:
        server = chain.wrapping(server, model)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = _bind(server, settings)
    await model.start(server)
    await model.serving(health_servicer, names)
    return RunningServer(server, port, health_servicer, model, None if chain is None else chain.drain)


def _model(services: Sequence[Service]) -> Model:
    """The one serving model of the process's server (a server is one or the other)."""
    models = {s.model for s in services}
    if len(models) > 1:
        raise ValueError(f"one server cannot serve both models: {', '.join(s.name for s in services)}")
    return models.pop() if models else AsyncioModel


def server_chain(
    provider: trace.TracerProvider | None,
    auth: AuthSettings,
    meters: MeterProvider | None = None,
) -> ServerChain:
    """Tracing (when a provider is given), identity (when an audience is set), the deadline and metrics (when
    a meter provider is given), around every handler."""
    verifier = None
    if auth.audience:
        verifier = TokenVerifier(
            audience=auth.audience,
            certs_url=auth.certs_url,
            issuers=auth.issuers,
            allowed_callers=auth.allowed_callers,
        )
    return ServerChain(provider, verifier, meters=meters, drain=Drain())


async def serve(
    default_service: str,
    factory: ServiceFactory,
    env: Env,
    *,
    provider: trace.TracerProvider,
    stop: asyncio.Event,
    on_ready: Callable[[RunningServer], None] | None = None,
    meters: MeterProvider | None = None,
    hurry: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set, then drain, after the lame duck unless `hurry` is set too. Raises ConfigError
    before serving if a setting is wrong."""
    settings = ServerSettings.from_env(env, default_service)
    auth = AuthSettings.from_env(env)
    calls = CallSettings.from_env(env)
    runtime = Runtime(settings.service, env, provider, calls, IdTokens(), meters)
    try:
        services = factory(runtime)
        running = await start(
            services, settings, chain=server_chain(provider, auth, meters), keepalive=calls.keepalive
        )
        tls = "TLS" if settings.tls_cert_file else "h2c"
        verified = f"ID tokens verified for {auth.audience}" if auth.audience else "no token verification"
        if auth.iam_only and not auth.audience:
            verified += " (AUTH_IAM_ONLY: Cloud Run's IAM alone guards it)"
        if auth.any_caller and auth.audience:
            log.warning(
                "AUTH_ANY_CALLER=true: every holder of a valid ID token for %s is admitted, any Google "
                "account included; set AUTH_ALLOWED_CALLERS to admit only the mesh's callers",
                auth.audience,
            )
        log.info(
            "%s serving %s on port %d (%s, %s)",
            settings.service,
            ", ".join(s.name for s in services),
            running.port,
            tls,
            verified,
            extra={"json_fields": {"event": "serving", "port": running.port}},  # the local mesh reads this
        )
        if on_ready:
            on_ready(running)
        await stop.wait()
        lame_duck = 0.0 if hurry is not None and hurry.is_set() else settings.lame_duck_seconds
        log.info(
            "%s shutting down: draining in-flight calls for up to %.1f s after a lame duck of %.1f s "
            "(NOT_SERVING, still serving)",
            settings.service,
            settings.grace_seconds,
            lame_duck,
        )
        drained = await running.stop(settings.grace_seconds, lame_duck)
        if drained is not None:
            log.log(
                logging.WARNING if drained.cut else logging.INFO,
                "%s drained: %d calls in flight, %d finished, %d cut at the end of the grace; %d new calls "
                "refused",
                settings.service,
                drained.in_flight,
                drained.finished,
                drained.cut,
                drained.refused,
                extra={"json_fields": {"event": "drained", **vars(drained), "finished": drained.finished}},
            )
    finally:
        await runtime.close()
    log.info("%s stopped", settings.service)


def _main_module(factory: ServiceFactory) -> str | None:
    """The module the service runs as (`python -m services.ping.main`, or the PEX's entry point, which runs
    it as __main__ too)."""
    if factory.__module__ != "__main__":
        return factory.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else None


def main(default_service: str, factory: ServiceFactory) -> None:
    """Entry point of a service's process."""
    env = dict(os.environ)
    name = text(env, "K_SERVICE", default_service) or default_service

    async def run() -> None:
        stop, hurry = asyncio.Event(), asyncio.Event()

        def interrupted() -> None:  # a developer's Ctrl-C: no front end to warn, so no lame duck
            hurry.set()
            stop.set()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, interrupted)
        propagate.set_global_textmap(propagation.propagator_from_env(env))
        provider = tracing.provider_from_env(env, name)
        trace.set_tracer_provider(provider)
        meters = metrics.provider_from_env(env, name)
        await serve(default_service, factory, env, provider=provider, stop=stop, meters=meters, hurry=hurry)

    try:
        worker = workers.worker_index(env)
        logs.configure(name, level=log_level(env), project=text(env, "GOOGLE_CLOUD_PROJECT"), worker=worker)
        count = workers.worker_count(env) if worker is None else 1
        if count > 1:
            settings = ServerSettings.from_env(env, default_service)  # wrong settings: said once
            command = workers.command_of(_main_module(factory))
            shutdown = settings.lame_duck_seconds + settings.grace_seconds
            raise SystemExit(workers.supervise(command, count, env, shutdown))
        if worker is not None:
            workers.become_worker(env)
        asyncio.run(run())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
