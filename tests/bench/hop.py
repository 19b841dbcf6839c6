"""The local Cloud Run's front end (Envoy) as one more hop: ping.Send and routeguide.ListFeatures sent by h2load
over TLS to the service's run.app name, through the front end to one and then two h2c instances, against h2load
over h2c straight to one instance (no front end).

The processes (two instances, the front end, h2load) are started once per service and share the machine's
cores, unpinned, as on one machine; the configurations take turns round after round (only the front end's
endpoints change between them), so drift hits all alike, and each is compared with direct in the same run.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from cloudrun import names
from cloudrun.frontend import FrontEnd
from cloudrun.frontend import Target as Traffic
from emulators.dev_ca import ensure_dev_certs
from ping import ping_pb2
from tests.bench.fixture import CLOUD_RUN_UNSAMPLED, service_argv
from tests.bench.load import Target
from tests.bench.processes import Server, cpu_seconds, unpin
from tests.bench.scenarios import LIST_FEATURES, MESSAGE, SEND, WORLD, Bench, pong_bytes
from tests.bench.stats import median, percentile

PROJECT_NUMBER, REGION = "123456789012", "europe-west1"
# The front end must not be what limits the load (h2load keeps 128 calls in flight): no per-instance cap.
UNCAPPED = 1000


@dataclass
class Config:
    """One way of reaching the service: direct (h2c to the first instance) or through the front end."""

    name: str
    behind: int  # instances behind the front end; 0: direct
    rates: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # instances + front end, per call


@dataclass(frozen=True)
class Service:
    name: str
    method: str
    request: bytes
    response_bytes: int = 0  # of one successful call (a lower bound for Send: its timestamp varies)
    messages: int = 1  # per call; a stream's are learnt from a real call

    @property
    def streaming(self) -> bool:
        return self.method == LIST_FEATURES


SERVICES = (
    Service("ping", SEND, ping_pb2.Request(message=MESSAGE).SerializeToString(), pong_bytes(MESSAGE)),
    Service("routeguide", LIST_FEATURES, WORLD.SerializeToString()),
)


async def measure(bench: Bench, step: Callable[[str], None]) -> list[list[str]]:
    """The table's rows: per service, direct then through the front end to one and two instances."""
    unpin()  # every process of this scenario may use every core
    bench.gen.core = None
    # The fixture's CA, its server certificate now covering the run.app names too.
    certs = ensure_dev_certs(bench.fx.certs.ca_cert.parent, [names.wildcard(REGION)])
    rows = []
    for service in SERVICES:
        configs = [
            Config(f"{service.name} direct, h2c to 1 instance", 0),
            Config(f"{service.name} through the front end, 1 instance", 1),
            Config(f"{service.name} through the front end, 2 instances", 2),
        ]
        front = FrontEnd(certs.server_cert, certs.server_key, project_number=PROJECT_NUMBER, region=REGION)
        env = bench.fx.h2c(bench.fx.featured_env(service.name))
        argv = service_argv(f"services.{service.name}.main")
        async with Server(service.name, argv, env, None) as first, Server(
            service.name, argv, env, None
        ) as second:
            await asyncio.to_thread(front.start)
            try:
                await _deploy(front, service.name, [first.port])
                service = await _answered(bench, service, first.port)
                pids = [first.pid, second.pid, front.pid or 0]
                for round_number in range(bench.plan.runs):
                    for config in configs:
                        step(f"{config.name}, round {round_number + 1} of {bench.plan.runs}")
                        ports = [first.port, second.port][: max(1, config.behind)]
                        await asyncio.to_thread(front.set_endpoints, _revision(service.name), ports)
                        await _check(bench, front, service, config, first.port)
                        await _run(bench, _target(bench, front, service, config, first.port), pids, config)
            finally:
                await asyncio.to_thread(front.stop)
        direct = median(configs[0].rates)
        unit = "msgs/s" if service.streaming else "calls/s"
        for config in configs:
            rate = median(config.rates)
            rows.append(
                [
                    config.name,
                    f"{rate:,.0f} {unit}",
                    f"{rate / direct:.2f}",
                    f"{median(config.p99s):.1f}",
                    f"{median(config.cpu_us):.0f}",
                    " / ".join(f"{r:,.0f}" for r in config.rates),
                ]
            )
    return rows


HEADER = [
    "configuration (all processes on the machine's cores)",
    "rate",
    "vs direct",
    "p99 ms",
    "CPU us/call",
    "runs",
]


def _revision(service: str) -> str:
    return f"{service}-00001-bench"


async def _deploy(front: FrontEnd, service: str, ports: Sequence[int]) -> None:
    revision = _revision(service)
    set_revision = functools.partial(front.set_revision, revision, timeout_s=300.0)
    if "concurrency" in inspect.signature(front.set_revision).parameters:  # the autoscaler's cap, when there
        set_revision = functools.partial(set_revision, concurrency=UNCAPPED)
    await asyncio.to_thread(set_revision)
    await asyncio.to_thread(front.set_service, service, [Traffic(revision, 100)])
    await asyncio.to_thread(front.set_endpoints, revision, ports)


def _target(bench: Bench, front: FrontEnd, service: Service, config: Config, direct_port: int) -> Target:
    direct = Target(
        f"127.0.0.1:{direct_port}",
        service.method,
        service.request,
        token=bench.fx.token(service.name),
        metadata=CLOUD_RUN_UNSAMPLED,
        streaming=service.streaming,
        min_response_bytes=service.response_bytes,
        exact=service.streaming,
        messages_per_call=service.messages,
    )
    if config.behind == 0:
        return direct
    # TLS to the run.app name (its SNI and :authority), the socket to the front end's port.
    return replace(
        direct, address=front.host(service.name), tls_ca=bench.fx.certs.ca_cert, connect_to=front.address
    )


def _channel(
    bench: Bench, front: FrontEnd, service: Service, config: Config, direct_port: int
) -> grpc.aio.Channel:
    if config.behind == 0:
        return grpc.aio.insecure_channel(f"127.0.0.1:{direct_port}", options=[("grpc.so_reuseport", 0)])
    host = front.host(service.name)
    credentials = grpc.ssl_channel_credentials(bench.fx.certs.ca_cert.read_bytes())
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.ssl_target_name_override", host),
        ("grpc.default_authority", host),
    ]
    return grpc.aio.secure_channel(front.address, credentials, options=options)


async def _stream(channel: grpc.aio.Channel, bench: Bench, service: Service) -> list[bytes]:
    call = channel.unary_stream(service.method, _raw, _raw)
    metadata = (("authorization", f"Bearer {bench.fx.token(service.name)}"),)
    return [m async for m in call(service.request, metadata=metadata, timeout=10)]


def _raw(data: bytes) -> bytes:
    return data


async def _answered(bench: Bench, service: Service, port: int) -> Service:
    """A stream's answer learnt from a real call (straight to an instance): its messages and their bytes."""
    if not service.streaming:
        return service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)]) as channel:
        answered = await _stream(channel, bench, service)
    return replace(service, response_bytes=sum(5 + len(m) for m in answered), messages=len(answered))


async def _check(bench: Bench, front: FrontEnd, service: Service, config: Config, direct_port: int) -> None:
    """A real client call, which sees grpc-status (h2load does not)."""
    async with _channel(bench, front, service, config, direct_port) as channel:
        if service.streaming:
            answered = await _stream(channel, bench, service)
            if sum(5 + len(m) for m in answered) != service.response_bytes:
                raise AssertionError(
                    f"{config.name}: {len(answered)} messages, not the {service.messages} expected"
                )
            return
        metadata = (("authorization", f"Bearer {bench.fx.token(service.name)}"),)
        unary = channel.unary_unary(service.method, _raw, ping_pb2.Response.FromString)
        reply = await unary(service.request, metadata=metadata, timeout=10)
        if reply.pong.message != MESSAGE:
            raise AssertionError(f"{config.name}: answered {reply.pong.message!r}")


async def _run(bench: Bench, target: Target, pids: Sequence[int], config: Config) -> None:
    """A warm-up thrown away, then one measured run with every call's time."""
    plan = bench.plan
    count, duration_s = None, None
    if target.streaming:  # by count (see Bench._measure), sized from the warm-up
        warm = await bench.gen.run(target, count=64)
        count = max(64, int(warm.rate * plan.run_s))
    else:
        await bench.gen.run(target, duration_s=plan.warmup_s)
        duration_s = plan.run_s
    before = sum(cpu_seconds(pid) for pid in pids)
    load = await bench.gen.run(target, latencies=True, count=count, duration_s=duration_s)
    spent = sum(cpu_seconds(pid) for pid in pids) - before
    config.rates.append(load.message_rate if target.streaming else load.rate)
    config.p99s.append(percentile(load.latencies_ms, 0.99))
    config.cpu_us.append(spent / load.calls * 1e6)
