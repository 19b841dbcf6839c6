"""The configurations measured: each starts fresh servers, checks a real call, warms up, then measures."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.routeguide.features import generated_database
from tests.bench.fixture import CLOUD_RUN_UNSAMPLED, Fixture, account, audience, service_argv
from tests.bench.load import Generator, Load, Target
from tests.bench.processes import Server
from tests.bench.stats import median, percentile

MESSAGE = "benchmark " + "x" * 54  # 64 characters
SEND, SEND_UPSTREAM = "/ping.PingService/Send", "/ping.PingService/SendUpstream"
LIST_FEATURES = "/routeguide.RouteGuide/ListFeatures"
GET_FEATURE = "/routeguide.RouteGuide/GetFeature"
OPEN_STREAMS = 250  # RouteChat streams held open: service.yaml's containerConcurrency
WORLD = route_guide_pb2.Rectangle(
    lo=route_guide_pb2.Point(latitude=-900000000, longitude=-1800000000),
    hi=route_guide_pb2.Point(latitude=900000000, longitude=1800000000),
)


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    run_s: float
    runs: int
    cold_starts: int
    survey_rounds: int
    hold_s: float = 300.0  # the deadline of a held-open RouteChat stream: longer than its measurement
    token_calls: int = 10_000

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(1.0, 3.0, 1, 2, 60, token_calls=2_000) if quick else cls(3.0, 10.0, 3, 5, 300)


@dataclass
class Throughput:
    rate: float  # calls/s (unary) or messages/s (streaming), median of the runs
    cpu_us: float  # server CPU per call or per message, median of the runs
    runs: list[float] = field(default_factory=list)
    rss_kb: int = 0
    peak_rss_kb: int = 0
    p99_ms: float = 0.0  # median of the runs' p99 call latency, when measured


def _ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


def _routes(channel: grpc.aio.Channel) -> route_guide_pb2_grpc.RouteGuideAsyncStub:
    return route_guide_pb2_grpc.RouteGuideStub(channel)  # type: ignore[return-value]


def pong_bytes(message: str) -> int:
    """The smallest body of a successful Send answer (the timestamp's nanos field may be absent)."""
    stamp = Timestamp(seconds=int(time.time()))
    return 5 + ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=message, received_on=stamp)).ByteSize()


class Bench:
    def __init__(
        self, fixture: Fixture, generator: Generator, plan: Plan, cores: tuple[int | None, int | None]
    ):
        self.fx = fixture
        self.gen = generator
        self.plan = plan
        self.server_core, self.load_core = cores

    def _metadata(self, service: str | None, trace_context: Headers = CLOUD_RUN_UNSAMPLED) -> Headers:
        return ((("authorization", f"Bearer {self.fx.token(service)}"),) if service else ()) + trace_context

    async def _measure(
        self, server: Server, target: Target, streaming: bool = False, latencies: bool = False
    ) -> Throughput:
        # Streams run by count, sized from the warm-up: h2load's duration mode cuts streams off mid-way, and
        # then neither its counts nor its bytes can be checked against whole answers.
        warm = await self.gen.run(target, **self._bound(streaming, None))  # thrown away
        rates, costs, p99s = [], [], []
        for _ in range(self.plan.runs):
            cpu = server.cpu_seconds()
            load: Load = await self.gen.run(target, latencies=latencies, **self._bound(streaming, warm.rate))
            spent = server.cpu_seconds() - cpu
            units = load.messages if streaming else load.calls
            rates.append(load.message_rate if streaming else load.rate)
            costs.append(spent / units * 1e6)
            if latencies:
                p99s.append(percentile(load.latencies_ms, 0.99))
        memory = server.memory_kb()
        p99 = median(p99s) if p99s else 0.0
        return Throughput(median(rates), median(costs), rates, memory["VmRSS"], memory["VmHWM"], p99)

    def _bound(self, streaming: bool, rate: float | None) -> dict[str, Any]:
        if not streaming:
            return {"duration_s": self.plan.warmup_s if rate is None else self.plan.run_s}
        seconds = self.plan.warmup_s if rate is None else self.plan.run_s
        return {"count": 64 if rate is None else max(64, int(rate * seconds))}

    # Unary ---------------------------------------------------------------------------------------------
    async def ping_send(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        tls: bool,
        service: str | None,
        trace_context: Headers = CLOUD_RUN_UNSAMPLED,
    ) -> Throughput:
        """Every call carries `trace_context` (by default Cloud Run's, unsampled), the raw server's too."""
        async with Server("ping", argv, env, self.server_core) as server:
            await self.check_send(server.port, tls, service)
            target = Target(
                f"127.0.0.1:{server.port}",
                SEND,
                ping_pb2.Request(message=MESSAGE).SerializeToString(),
                tls_ca=self.fx.certs.ca_cert if tls else None,
                token=self.fx.token(service) if service else None,
                metadata=trace_context,
                min_response_bytes=pong_bytes(MESSAGE),
            )
            result = await self._measure(server, target)
            await self.check_send(server.port, tls, service)
        return result

    async def check_send(self, port: int, tls: bool, service: str | None, method: str = "Send") -> None:
        """A real client call: grpc-status 0 and the echoed message (h2load never looks at trailers)."""
        async with self.fx.channel(port, tls) as channel:
            reply = await getattr(_ping(channel), method)(
                ping_pb2.Request(message=MESSAGE), metadata=self._metadata(service), timeout=10
            )
        expected = MESSAGE + (" (relayed)" if method == "SendUpstream" else "")
        if reply.pong.message != expected:
            raise AssertionError(f"{method} answered {reply.pong.message!r}, not {expected!r}")

    # Relay and tokens ----------------------------------------------------------------------------------
    async def relay(self) -> tuple[Throughput, int, int]:
        """(throughput of client -> ping.SendUpstream -> ping-upstream.Send, calls made, tokens minted)."""
        upstream_env = self.fx.featured_env("ping-upstream", callers=("ping",))
        # Two server processes, two cores: the relay gets the server core, the upstream shares the load core.
        async with Server(
            "ping-upstream", service_argv("services.ping.main"), upstream_env, self.load_core
        ) as up:
            env = {
                **self.fx.featured_env("ping"),
                "GRPC_PING_HOST": f"127.0.0.1:{up.port}",
                "GRPC_PING_HOST_AUDIENCE": audience("ping-upstream"),
            }
            async with Server("ping", service_argv("services.ping.main"), env, self.server_core) as relay:
                await self.check_send(relay.port, True, "ping", "SendUpstream")
                target = Target(
                    f"127.0.0.1:{relay.port}",
                    SEND_UPSTREAM,
                    ping_pb2.Request(message=MESSAGE).SerializeToString(),
                    tls_ca=self.fx.certs.ca_cert,
                    token=self.fx.token("ping"),
                    metadata=CLOUD_RUN_UNSAMPLED,
                    min_response_bytes=pong_bytes(MESSAGE + " (relayed)"),
                )
                counted = await self.gen.run(target, count=self.plan.token_calls)
                calls = 1 + counted.calls
                minted = self.fx.identity.identity_requests(account("ping"), audience("ping-upstream"))
                result = await self._measure(relay, target)
                await self.check_send(relay.port, True, "ping", "SendUpstream")
        return result, calls, minted

    # Streaming -----------------------------------------------------------------------------------------
    async def list_features(
        self, argv: Sequence[str], env: dict[str, str], tls: bool, service: str | None
    ) -> Throughput:
        async with Server("routeguide", argv, env, self.server_core) as server:
            async with self.fx.channel(server.port, tls) as channel:
                features = [
                    f
                    async for f in _routes(channel).ListFeatures(
                        WORLD, metadata=self._metadata(service), timeout=10
                    )
                ]
            if len(features) != len(generated_database().features):
                raise AssertionError(f"ListFeatures sent {len(features)} features, not the whole database")
            target = Target(
                f"127.0.0.1:{server.port}",
                LIST_FEATURES,
                WORLD.SerializeToString(),
                tls_ca=self.fx.certs.ca_cert if tls else None,
                token=self.fx.token(service) if service else None,
                metadata=CLOUD_RUN_UNSAMPLED,
                streaming=True,
                min_response_bytes=sum(5 + f.ByteSize() for f in features),
                exact=True,
                messages_per_call=len(features),
            )
            return await self._measure(server, target, streaming=True)

    # Unary beside open streams -------------------------------------------------------------------------
    async def get_feature_beside_streams(self) -> tuple[Throughput, Throughput]:
        """GetFeature on the full-featured routeguide (throughput, p99): alone, then with OPEN_STREAMS
        RouteChat streams held open on the same server."""
        env = self.fx.featured_env("routeguide")
        async with Server(
            "routeguide", service_argv("services.routeguide.main"), env, self.server_core
        ) as server:
            stored = generated_database().features[0]
            point = route_guide_pb2.Point(latitude=stored.latitude, longitude=stored.longitude)
            answer = route_guide_pb2.Feature(name=stored.name, location=point)
            target = Target(
                f"127.0.0.1:{server.port}",
                GET_FEATURE,
                point.SerializeToString(),
                tls_ca=self.fx.certs.ca_cert,
                token=self.fx.token("routeguide"),
                metadata=CLOUD_RUN_UNSAMPLED,
                min_response_bytes=5 + answer.ByteSize(),  # not exact: see load.Generator on h2load's counts
            )
            await self._check_feature(server.port, point, answer)
            alone = await self._measure(server, target, latencies=True)
            async with self._open_chats(server.port, OPEN_STREAMS):
                beside = await self._measure(server, target, latencies=True)
            await self._check_feature(server.port, point, answer)
        return alone, beside

    async def _check_feature(
        self, port: int, point: route_guide_pb2.Point, answer: route_guide_pb2.Feature
    ) -> None:
        async with self.fx.channel(port, True) as channel:
            found = await _routes(channel).GetFeature(
                point, metadata=self._metadata("routeguide"), timeout=10
            )
        if found != answer:
            raise AssertionError(f"GetFeature answered {found}, not {answer}")

    @contextlib.asynccontextmanager
    async def _open_chats(self, port: int, count: int) -> AsyncIterator[None]:
        """`count` RouteChat streams, each with one note sent (at a location of its own) and then idle, held
        open for the block (each with a deadline) and cancelled after. Checked before and after the block:
        the server has every stream's note, and no stream has ended."""

        def note(i: int) -> route_guide_pb2.RouteNote:
            where = route_guide_pb2.Point(latitude=400_000_000 + i * 1_000, longitude=-740_000_000)
            return route_guide_pb2.RouteNote(location=where, message=f"held open {i}")

        async with self.fx.channel(port, True) as channel:
            chat = _routes(channel).RouteChat
            metadata = self._metadata("routeguide")
            calls = []
            try:
                for i in range(count):
                    call = chat(metadata=metadata, timeout=self.plan.hold_s)
                    await call.write(note(i))
                    calls.append(call)
                # One more stream posts a note at each of those locations: the server answers each with the
                # held stream's note, so each arrived.
                probe = chat(iter([note(i) for i in range(count)]), metadata=metadata, timeout=30)
                echoed = [n.message async for n in probe]
                if echoed != [note(i).message for i in range(count)]:
                    raise AssertionError(f"{len(echoed)} of {count} held RouteChat notes reached the server")
                if any(c.done() for c in calls):
                    raise AssertionError("a held RouteChat stream ended before the load")
                yield
                ended = [c for c in calls if c.done()]
                if ended:
                    raise AssertionError(f"{len(ended)} held RouteChat streams ended during the load")
            finally:
                for call in calls:
                    call.cancel()

    # Survey --------------------------------------------------------------------------------------------
    async def survey(self) -> dict[str, float]:
        """p50 latencies (ms) at one call in flight: Survey, and each of its downstream calls made directly."""
        argv = service_argv
        async with Server(
            "ping", argv("services.ping.main"), self.fx.featured_env("ping", ("aggregator",)), self.load_core
        ) as ping, Server(
            "routeguide",
            argv("services.routeguide.main"),
            self.fx.featured_env("routeguide", ("aggregator",)),
            self.load_core,
        ) as routes:
            env = {
                **self.fx.featured_env("aggregator"),
                "PING_ADDR": f"127.0.0.1:{ping.port}",
                "PING_ADDR_AUDIENCE": audience("ping"),
                "ROUTEGUIDE_ADDR": f"127.0.0.1:{routes.port}",
                "ROUTEGUIDE_ADDR_AUDIENCE": audience("routeguide"),
            }
            async with Server("aggregator", argv("services.aggregator.main"), env, self.server_core) as agg:
                return await self._survey_rounds(agg.port, ping.port, routes.port)

    async def _survey_rounds(self, agg_port: int, ping_port: int, routes_port: int) -> dict[str, float]:
        first = generated_database().features[0]
        span = 2_000_000  # 0.2 degrees each way: a handful of features
        area = route_guide_pb2.Rectangle(
            lo=route_guide_pb2.Point(latitude=first.latitude - span, longitude=first.longitude - span),
            hi=route_guide_pb2.Point(latitude=first.latitude + span, longitude=first.longitude + span),
        )
        route = [
            route_guide_pb2.Point(latitude=first.latitude + i * 10_000, longitude=first.longitude)
            for i in range(10)
        ]
        request = aggregator_pb2.SurveyRequest(message=MESSAGE, area=area, route=route)
        timings: dict[str, list[float]] = {
            "survey": [],
            "ping.Send": [],
            "ListFeatures": [],
            "RecordRoute": [],
        }
        async with self.fx.channel(agg_port, True) as a, self.fx.channel(
            ping_port, True
        ) as p, self.fx.channel(routes_port, True) as r:
            aggregator = aggregator_pb2_grpc.AggregatorStub(a)
            ping, routes = _ping(p), _routes(r)
            md_a, md_p, md_r = (
                self._metadata("aggregator"),
                self._metadata("ping"),
                self._metadata("routeguide"),
            )

            async def survey() -> None:
                response = await aggregator.Survey(request, metadata=md_a, timeout=10)
                if any(call.code != 0 for call in response.calls):
                    raise AssertionError(f"a Survey downstream call failed: {response.calls}")

            async def send() -> None:
                await ping.Send(ping_pb2.Request(message=MESSAGE), metadata=md_p, timeout=10)

            async def listing() -> None:
                [f async for f in routes.ListFeatures(area, metadata=md_r, timeout=10)]

            async def record() -> None:
                await routes.RecordRoute(iter(route), metadata=md_r, timeout=10)

            calls = {"survey": survey, "ping.Send": send, "ListFeatures": listing, "RecordRoute": record}
            deadline = time.monotonic() + 120
            for round_number in range(self.plan.survey_rounds + 20):  # the first 20 rounds warm up
                if time.monotonic() > deadline:
                    break
                for name, call in calls.items():  # interleaved, so drift hits all alike
                    started = time.perf_counter()
                    await call()
                    if round_number >= 20:
                        timings[name].append((time.perf_counter() - started) * 1000)
        p50 = {name: percentile(values, 0.5) for name, values in timings.items()}
        p50["survey p99"] = percentile(timings["survey"], 0.99)
        return p50

    # Cold start ----------------------------------------------------------------------------------------
    async def cold_start(
        self, argv: Sequence[str], env: dict[str, str], runs: int | None = None
    ) -> list[float]:
        """Milliseconds from spawn to the first served RPC (TLS + token + tracing), each run a fresh process."""
        times = []
        for _ in range(runs or self.plan.cold_starts):
            async with Server("ping", argv, env, self.server_core) as server:
                await self.check_send(server.port, True, "ping")
                times.append((time.perf_counter() - server.started_at) * 1000)
        return times


def pex_forms(pex: Path, workdir: Path) -> dict[str, list[str]]:
    """How the packaged service can start: the PEX itself, and the venv the image installs from it."""
    venv = workdir / "ping-venv"
    if not venv.exists():
        subprocess.run(
            [sys.executable, str(pex), "venv", "--compile", str(venv)],
            env={**os.environ, "PEX_TOOLS": "1"},
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
    return {
        "ping.pex": [sys.executable, str(pex)],
        "venv from ping.pex (the image's form)": [str(venv / "pex")],
    }


def source_argv() -> list[str]:
    return service_argv("services.ping.main")


def pex_env(env: dict[str, str], pex_root: Path) -> dict[str, str]:
    """The packaged form imports from itself only: no source tree on the path."""
    out = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    out["PEX_ROOT"] = str(pex_root)
    return out
