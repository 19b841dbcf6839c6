"""The mesh's benchmark: what TLS, ID-token verification and tracing cost against bare gRPC servers (grpc.aio,
grpc.aio on uvloop, sync with 4 and 256 workers) and against a naive full-featured sync build.

`./pants run tests/bench:bench -- [--quick]` (from the repo root). Servers run on one core and the load
generator on another; every configuration gets fresh servers, a checked real call, a warm-up, then runs
whose median is reported. Prints Markdown tables, the targets, and `full-featured/raw: X.XX` last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench import h2load, hop
from tests.bench.fixture import CLOUD_RUN_UNSAMPLED, Fixture, service_argv
from tests.bench.layered_server import LAYERS
from tests.bench.load import Generator
from tests.bench.processes import cores, pin
from tests.bench.scenarios import OPEN_STREAMS, Bench, Plan, Throughput, pex_env, pex_forms, source_argv
from tests.bench.stats import median, table

RAW = service_argv("tests.bench.raw_server")
RAW_ROUTES = RAW + ["routeguide"]
NAIVE = service_argv("tests.bench.naive_server")
LAYERED = service_argv("tests.bench.layered_server")


TRACE_NAMES = {True: "Cloud Run's unsampled traceparent", False: "no trace context (1% sampled, exported)"}


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model
            )
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )


def ensure_pex(path: Path) -> Path | None:
    """The packaged ping service, rebuilt (when run from the repo) if missing or older than its sources."""
    sources = [
        p for d in ("libs/mesh", "services/ping", "protos/ping") for p in Path(d).glob("*") if p.is_file()
    ]
    stale = not path.exists() or any(p.stat().st_mtime > path.stat().st_mtime for p in sources)
    if stale and Path("pants").exists():
        print("... ./pants --no-pantsd package services/ping:ping", flush=True)
        subprocess.run(
            ["./pants", "--no-pantsd", "package", "services/ping:ping"],
            check=False,
            timeout=1200,
            stdout=subprocess.DEVNULL,
        )
    return path if path.exists() else None


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}"


async def started(args: argparse.Namespace) -> Bench:
    """The harness, ready: the load generator chosen and pinned off the server's core, the fixture started."""
    plan = Plan.of(args.quick)
    server_core, load_core = cores()
    pin(load_core)  # the harness (emulator, span sink, survey client) stays off the server's core
    found = None if args.python_load else h2load.find_or_install()
    generator = Generator(found, load_core)
    print(f"machine: {machine()}")
    print(
        f"server core {server_core}, load core {load_core}, load generator {generator.name}, "
        f"{generator.clients * generator.streams} calls in flight, {plan.runs} x {plan.run_s:g} s after "
        f"{plan.warmup_s:g} s warm-up",
        flush=True,
    )
    fx = Fixture()
    await fx.start()
    return Bench(fx, generator, plan, (server_core, load_core))


@dataclass(frozen=True)
class Unary:
    """One measured unary configuration of the main table."""

    name: str
    result: Throughput
    traced: bool = True  # its calls carry Cloud Run's unsampled traceparent (False: no trace context)


@dataclass(frozen=True)
class RawBase:
    column: str  # its ratio column, "vs <column>"
    model: str  # raw_server's argument
    name: str


# The ratio columns: the raw servers, then the naive full build (with the row's trace condition).
RAW_BASES = (
    RawBase("raw aio", "aio", "raw grpc.aio (h2c, no interceptors)"),
    RawBase("raw uvloop", "uvloop", "raw grpc.aio on uvloop"),
    RawBase("raw sync w4", "sync4", "raw sync grpc.server, 4 workers"),
    RawBase("raw sync w256", "sync256", "raw sync grpc.server, 256 workers (holds 250 streams)"),
)
NAIVE_WORKERS = (4, 256)


async def run(args: argparse.Namespace) -> int:
    bench = await started(args)
    fx = bench.fx
    ping_main = service_argv("services.ping.main")
    routes_main = service_argv("services.routeguide.main")
    featured = fx.featured_env("ping")
    raw: dict[str, Throughput] = {}
    naive: dict[tuple[int, bool], Throughput] = {}  # (workers, traced)
    unary: list[Unary] = []
    contexts = {True: CLOUD_RUN_UNSAMPLED, False: ()}

    try:
        for base in RAW_BASES:
            step(f"ping.Send, {base.name}")
            raw[base.column] = await bench.ping_send(RAW + ["ping", base.model], fx.base_env(), False, None)
            unary.append(Unary(f"ping.Send {base.name}", raw[base.column]))
        for workers in NAIVE_WORKERS:
            for traced, context in contexts.items():
                step(f"ping.Send, naive full sync build, {workers} workers, {TRACE_NAMES[traced]}")
                result = await bench.ping_send(
                    NAIVE + [str(workers)], featured, True, "ping", trace_context=context
                )
                naive[(workers, traced)] = result
                unary.append(
                    Unary(
                        f"ping.Send naive full sync, {workers} workers, {TRACE_NAMES[traced]}", result, traced
                    )
                )
        full: dict[bool, Throughput] = {}
        for traced, context in contexts.items():
            step(f"ping.Send, full-featured, {TRACE_NAMES[traced]}")
            full[traced] = await bench.ping_send(ping_main, featured, True, "ping", trace_context=context)
            unary.append(
                Unary(
                    f"ping.Send full: TLS + ID token + tracing, {TRACE_NAMES[traced]}", full[traced], traced
                )
            )
        step("ping.Send, full-featured over h2c")
        full_h2c = await bench.ping_send(ping_main, fx.h2c(featured), False, "ping")
        unary.append(Unary("ping.Send full over h2c (Cloud Run: TLS ends at the front end)", full_h2c))
        step("relay")
        relay, calls, minted = await bench.relay()
        unary.append(Unary("ping.SendUpstream relay, one hop (all full)", relay))

        step("ListFeatures, raw")
        raw_stream = await bench.list_features(RAW_ROUTES, fx.base_env(), False, None)
        step("ListFeatures, full-featured")
        full_stream = await bench.list_features(
            routes_main, fx.featured_env("routeguide"), True, "routeguide"
        )

        step(f"GetFeature, full-featured, alone and beside {OPEN_STREAMS} open RouteChat streams")
        alone, beside = await bench.get_feature_beside_streams()

        step("Survey at 1 call in flight")
        latency = await bench.survey()
        slowest = max(latency[k] for k in ("ping.Send", "ListFeatures", "RecordRoute"))

        step("cold start")
        starts: dict[str, list[float]] = {"from source": await bench.cold_start(source_argv(), featured)}
        pex = ensure_pex(Path(args.pex))
        if pex is None:
            print(f"no {args.pex}: run ./pants package services/ping:ping for the packaged cold start")
        else:
            with tempfile.TemporaryDirectory(prefix="bench-pex-") as work:
                root = Path(work)
                env = pex_env(featured, root / "pex_root")
                for form, argv in (await asyncio.to_thread(pex_forms, pex, root)).items():
                    if form == "ping.pex":  # its first run builds a venv under PEX_ROOT: shown apart
                        starts["ping.pex, first run (builds its venv)"] = await bench.cold_start(
                            argv, env, runs=1
                        )
                    starts[form] = await bench.cold_start(argv, env)
    finally:
        await fx.stop()

    def unary_row(row: Unary) -> list[str]:
        bases = [*raw.values(), *(naive[(w, row.traced)] for w in NAIVE_WORKERS)]
        return [
            row.name,
            f"{row.result.rate:,.0f}",
            *(ratio(row.result.rate, b.rate) for b in bases),
            f"{row.result.cpu_us:.0f}",
            f"{row.result.peak_rss_kb / 1024:.0f}",
            " / ".join(f"{r:,.0f}" for r in row.result.runs),
        ]

    print()
    vs = [f"vs {b.column}" for b in RAW_BASES] + [f"vs naive w{w}" for w in NAIVE_WORKERS]
    header = ["ping, unary", "calls/s", *vs, "server CPU us/call", "peak RSS MB", "runs"]
    print(table(header, [unary_row(row) for row in unary]))
    print(
        "(vs naive: the naive build with the row's trace condition; raw rows carry Cloud Run's unsampled one)"
    )
    print()
    print(
        table(
            [
                "ListFeatures (500 features/call)",
                "msgs/s",
                "vs raw",
                "server CPU us/msg",
                "peak RSS MB",
                "runs",
            ],
            [
                [
                    name,
                    f"{result.rate:,.0f}",
                    ratio(result.rate, raw_stream.rate),
                    f"{result.cpu_us:.1f}",
                    f"{result.peak_rss_kb / 1024:.0f}",
                    " / ".join(f"{r:,.0f}" for r in result.runs),
                ]
                for name, result in (
                    ("ListFeatures raw grpc.aio", raw_stream),
                    ("ListFeatures full: TLS + ID token + tracing", full_stream),
                )
            ],
        )
    )
    print()
    print(
        table(
            [
                "GetFeature full (routeguide)",
                "calls/s",
                "vs alone",
                "p99 ms",
                "server CPU us/call",
                "peak RSS MB",
            ],
            [
                [
                    name,
                    f"{result.rate:,.0f}",
                    ratio(result.rate, alone.rate),
                    f"{result.p99_ms:.2f}",
                    f"{result.cpu_us:.0f}",
                    f"{result.peak_rss_kb / 1024:.0f}",
                ]
                for name, result in (
                    ("alone", alone),
                    (f"beside {OPEN_STREAMS} open RouteChat streams", beside),
                )
            ],
        )
    )
    print()
    survey_rows = [[name, f"{value:.2f}"] for name, value in latency.items()]
    print(table(["Survey at 1 in flight", "p50 ms"], survey_rows))
    print()
    print(
        table(
            ["cold start to first served RPC", "median ms", "runs"],
            [[form, f"{median(t):.0f}", " / ".join(f"{v:.0f}" for v in t)] for form, t in starts.items()],
        )
    )
    print()
    print(
        f"ID tokens minted by the relay for {calls:,} calls to one audience: {minted}; "
        f"spans received by the sink: {fx.sink.spans:,}"
    )

    image_form = starts.get("venv from ping.pex (the image's form)")
    honest, small = raw["raw sync w256"], raw["raw sync w4"]
    best_name, best = max(raw.items(), key=lambda item: item[1].rate)
    targets = [
        *(
            (
                f"full ping (TLS) >= 1.1 x naive full sync, {TRACE_NAMES[traced]}",
                all(full[traced].rate >= 1.1 * naive[(w, traced)].rate for w in NAIVE_WORKERS),
                ", ".join(
                    f"{ratio(full[traced].rate, naive[(w, traced)].rate)} vs w{w}" for w in NAIVE_WORKERS
                ),
            )
            for traced in contexts
        ),
        (
            "full ping (TLS) >= 0.80 x raw sync w256",
            full[True].rate >= 0.80 * honest.rate,
            f"{ratio(full[True].rate, honest.rate)} (vs w4: {ratio(full[True].rate, small.rate)}; "
            f"vs the best raw, {best_name}: {ratio(full[True].rate, best.rate)})",
        ),
        (
            "full-featured unary QPS / raw aio >= 0.85",
            full[True].rate >= 0.85 * raw["raw aio"].rate,
            ratio(full[True].rate, raw["raw aio"].rate),
        ),
        (
            "ListFeatures full msgs/s >= raw aio",
            full_stream.rate >= raw_stream.rate,
            ratio(full_stream.rate, raw_stream.rate),
        ),
        (
            "Survey p50 <= slowest downstream p50 + 1 ms",
            latency["survey"] <= slowest + 1.0,
            f"{latency['survey']:.2f} vs {slowest:.2f} ms",
        ),
        (
            f"unary beside {OPEN_STREAMS} RouteChat streams vs alone (reported)",
            None,
            f"throughput {ratio(beside.rate, alone.rate)}, p99 {beside.p99_ms:.2f} vs {alone.p99_ms:.2f} ms",
        ),
        (
            "cold start (installed venv) <= 300 ms",
            bool(image_form) and median(image_form or [0]) <= 300,
            f"{median(image_form):.0f} ms" if image_form else "no PEX",
        ),
        (
            "RSS under load <= 70 MB",
            full[True].peak_rss_kb <= 70 * 1024,
            f"{full[True].peak_rss_kb / 1024:.0f} MB",
        ),
        ("1 ID token minted per audience", minted == 1, f"{minted} for {calls:,} calls"),
    ]
    print()
    met = {True: "yes", False: "NO", None: "-"}
    print(table(["target", "met", "measured"], [[n, met[ok], m] for n, ok, m in targets]))
    print()
    print(f"full-featured/raw: {full[True].rate / raw['raw aio'].rate:.2f}")
    return 0


async def layers(args: argparse.Namespace) -> int:
    """ping.Send with the mesh's layers added one at a time: what each costs per call, in one run."""
    bench = await started(args)
    fx = bench.fx
    h2c = fx.h2c(fx.featured_env("ping"))
    steps: list[tuple[str, list[str], dict[str, str], bool, str | None]] = [
        # The service's own model (services.ping.main.MODEL: threads), with the pool it gets (SERVER_THREADS).
        (
            "raw grpc.server, 256 threads (h2c, no interceptors)",
            RAW + ["ping", "sync256"],
            fx.base_env(),
            False,
            None,
        )
    ]
    for layer, what in LAYERS.items():
        token = "ping" if list(LAYERS).index(layer) >= list(LAYERS).index("token") else None
        steps.append((what, LAYERED + [layer], h2c, False, token))
    steps.append(
        (
            "the ping service process, h2c (+ OTLP exporter, logging)",
            service_argv("services.ping.main"),
            h2c,
            False,
            "ping",
        )
    )
    steps.append(
        (
            "the ping service process, TLS",
            service_argv("services.ping.main"),
            fx.featured_env("ping"),
            True,
            "ping",
        )
    )
    rows: list[list[str]] = []
    results: list[Throughput] = []
    try:
        for name, argv, env, tls, service in steps:
            step(name)
            result = await bench.ping_send(argv, env, tls, service)
            base = results[0] if results else result
            added = result.cpu_us - results[-1].cpu_us if results else 0.0
            results.append(result)
            rows.append(
                [
                    name,
                    f"{result.rate:,.0f}",
                    ratio(result.rate, base.rate),
                    f"{result.cpu_us:.0f}",
                    f"{added:+.0f}" if len(results) > 1 else "",
                    " / ".join(f"{r:,.0f}" for r in result.runs),
                ]
            )
    finally:
        await fx.stop()
    print()
    print(table(["ping.Send server", "calls/s", "vs raw", "CPU us/call", "added", "runs (calls/s)"], rows))
    return 0


async def operating(args: argparse.Namespace) -> int:
    """What operating the mesh costs and gains, in one run: RED metrics per call (ping.Send, h2c, full
    features, metrics off then on), and one worker process against two, unpinned (the load generator shares
    the machine's cores with the workers)."""
    bench = await started(args)
    fx = bench.fx
    ping_main = service_argv("services.ping.main")
    h2c = fx.h2c(fx.featured_env("ping"))
    metered = {
        **h2c,
        "OTEL_METRICS_EXPORTER": "otlp",  # to the sink, as in production (Cloud Monitoring: every 60 s)
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    rows: list[list[str]] = []

    def row(name: str, result: Throughput) -> None:
        runs = " / ".join(f"{r:,.0f}" for r in result.runs)
        rows.append([name, f"{result.rate:,.0f}", ratio(result.rate, off.rate), f"{result.cpu_us:.1f}", runs])

    try:
        step("ping.Send full h2c, metrics off")
        off = await bench.ping_send(ping_main, h2c, False, "ping")
        step("ping.Send full h2c, metrics on (OTLP every 1 s)")
        on = await bench.ping_send(ping_main, metered, False, "ping")
        row("ping.Send full h2c, one core, metrics off", off)
        row("ping.Send full h2c, one core, metrics on", on)
        server_core = bench.server_core
        bench.server_core = None  # unpinned: the workers may use every core
        for count in (1, 2):
            step(f"ping.Send full h2c, metrics on, WORKER_PROCESSES={count}, unpinned")
            workers = {**metered, "WORKER_PROCESSES": str(count)}
            result = await bench.ping_send(ping_main, workers, False, "ping")
            row(
                f"ping.Send full h2c, metrics on, {count} worker(s), all cores (shared with the load)", result
            )
        bench.server_core = server_core
    finally:
        await fx.stop()
    print()
    print(table(["configuration", "calls/s", "vs metrics off", "server CPU us/call", "runs"], rows))
    print()
    print(
        f"metrics cost per call: {on.cpu_us - off.cpu_us:+.1f} us of server CPU; exports received: {fx.sink.metrics.exports}"
    )
    return 0


async def front_end(args: argparse.Namespace) -> int:
    """ping.Send and ListFeatures through the local Cloud Run's front end to one and two instances, against
    direct: the cost of the hop, and what a second instance buys."""
    bench = await started(args)
    try:
        rows = await hop.measure(bench, step)
    finally:
        await bench.fx.stop()
    print()
    print(table(hop.HEADER, rows))
    print(
        "(rate: the median of the rounds; p99 of each call's time, median of the rounds; CPU: the instances'"
    )
    print(" and the front end's, per call or per stream; vs direct: in the same run)")
    return 0


_BEGUN = time.monotonic()


def step(name: str) -> None:
    print(f"... {time.monotonic() - _BEGUN:4.0f} s: {name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one short run per configuration (harness check)"
    )
    parser.add_argument("--pex", default="dist/services.ping/ping.pex", help="the packaged ping service")
    parser.add_argument(
        "--python-load", action="store_true", help="use the Python load generator, not h2load"
    )
    parser.add_argument(
        "--layers", action="store_true", help="only ping.Send, the mesh's layers added one at a time"
    )
    parser.add_argument(
        "--operating", action="store_true", help="only the cost of metrics and the worker processes' gain"
    )
    parser.add_argument(
        "--front-end",
        action="store_true",
        help="only ping.Send and ListFeatures through the local Cloud Run's front end, against direct",
    )
    args = parser.parse_args()
    mode = layers if args.layers else operating if args.operating else front_end if args.front_end else run
    sys.exit(asyncio.run(mode(args)))


if __name__ == "__main__":
    main()
