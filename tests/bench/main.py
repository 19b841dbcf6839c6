"""The mesh's benchmark: what TLS, ID-token verification and tracing cost against a bare grpc.aio server.

`./pants run tests/bench:bench -- [--quick]` (from the repo root). Servers run on one core and the load
generator on another; every configuration gets fresh servers, a checked real call, a warm-up, then runs
whose median is reported. Prints a Markdown table, the targets, and `full-featured/raw: X.XX` last.
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
from pathlib import Path

from tests.bench import h2load
from tests.bench.fixture import Fixture, service_argv
from tests.bench.layered_server import LAYERS
from tests.bench.load import Generator
from tests.bench.processes import cores, pin
from tests.bench.scenarios import Bench, Plan, Throughput, pex_env, pex_forms, source_argv
from tests.bench.stats import median, table

RAW_PING = service_argv("tests.bench.raw_server") + ["ping"]
RAW_ROUTES = service_argv("tests.bench.raw_server") + ["routeguide"]
LAYERED = service_argv("tests.bench.layered_server")


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


async def run(args: argparse.Namespace) -> int:
    bench = await started(args)
    fx = bench.fx
    rows: list[list[str]] = []
    ping_main = service_argv("services.ping.main")
    routes_main = service_argv("services.routeguide.main")

    def unary_row(name: str, result: Throughput, base: Throughput | None) -> None:
        rows.append(
            [
                name,
                f"{result.rate:,.0f} calls/s",
                ratio(result.rate, base.rate) if base else "1.00",
                f"{result.cpu_us:.0f}",
                f"{result.peak_rss_kb / 1024:.0f}",
                " / ".join(f"{r:,.0f}" for r in result.runs),
            ]
        )

    try:
        step("ping.Send, raw")
        raw = await bench.ping_send(RAW_PING, fx.base_env(), False, None)
        unary_row("ping.Send raw grpc.aio (h2c, no interceptors)", raw, None)
        step("ping.Send, full-featured")
        full = await bench.ping_send(ping_main, fx.featured_env("ping"), True, "ping")
        unary_row("ping.Send full: TLS + ID token + tracing (Cloud Run's unsampled traceparent)", full, raw)
        step("ping.Send, full-featured, calls without trace context (1% start sampled, exported traces)")
        rooted = await bench.ping_send(ping_main, fx.featured_env("ping"), True, "ping", trace_context=())
        unary_row("ping.Send full, no traceparent: 1% of calls sampled + exported (OTLP)", rooted, raw)
        step("ping.Send, full-featured over h2c")
        full_h2c = await bench.ping_send(ping_main, fx.h2c(fx.featured_env("ping")), False, "ping")
        unary_row("ping.Send full over h2c (Cloud Run: TLS ends at the front end)", full_h2c, raw)
        step("relay")
        relay, calls, minted = await bench.relay()
        unary_row("ping.SendUpstream relay, one hop (all full)", relay, raw)

        step("ListFeatures, raw")
        raw_stream = await bench.list_features(RAW_ROUTES, fx.base_env(), False, None)
        step("ListFeatures, full-featured")
        full_stream = await bench.list_features(
            routes_main, fx.featured_env("routeguide"), True, "routeguide"
        )
        for name, result, base in (
            ("ListFeatures raw grpc.aio (500 features/call)", raw_stream, None),
            ("ListFeatures full: TLS + ID token + tracing", full_stream, raw_stream),
        ):
            rows.append(
                [
                    name,
                    f"{result.rate:,.0f} msgs/s",
                    ratio(result.rate, base.rate) if base else "1.00",
                    f"{result.cpu_us:.1f}/msg",
                    f"{result.peak_rss_kb / 1024:.0f}",
                    " / ".join(f"{r:,.0f}" for r in result.runs),
                ]
            )

        step("Survey at 1 call in flight")
        latency = await bench.survey()
        slowest = max(latency[k] for k in ("ping.Send", "ListFeatures", "RecordRoute"))

        step("cold start")
        starts: dict[str, list[float]] = {
            "from source": await bench.cold_start(source_argv(), fx.featured_env("ping"))
        }
        pex = ensure_pex(Path(args.pex))
        if pex is None:
            print(f"no {args.pex}: run ./pants package services/ping:ping for the packaged cold start")
        else:
            with tempfile.TemporaryDirectory(prefix="bench-pex-") as work:
                root = Path(work)
                env = pex_env(fx.featured_env("ping"), root / "pex_root")
                for form, argv in (await asyncio.to_thread(pex_forms, pex, root)).items():
                    if form == "ping.pex":  # its first run builds a venv under PEX_ROOT: shown apart
                        starts["ping.pex, first run (builds its venv)"] = await bench.cold_start(
                            argv, env, runs=1
                        )
                    starts[form] = await bench.cold_start(argv, env)
    finally:
        await fx.stop()

    print()
    print(table(["configuration", "throughput", "vs raw", "server CPU us/call", "peak RSS MB", "runs"], rows))
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
    targets = [
        ("full-featured unary QPS / raw >= 0.85", full.rate / raw.rate >= 0.85, ratio(full.rate, raw.rate)),
        (
            "ListFeatures msgs/s / raw >= 0.90",
            full_stream.rate / raw_stream.rate >= 0.90,
            ratio(full_stream.rate, raw_stream.rate),
        ),
        (
            "Survey p50 <= slowest downstream p50 + 1 ms",
            latency["survey"] <= slowest + 1.0,
            f"{latency['survey']:.2f} vs {slowest:.2f} ms",
        ),
        (
            "cold start (installed venv) <= 300 ms",
            bool(image_form) and median(image_form or [0]) <= 300,
            f"{median(image_form):.0f} ms" if image_form else "no PEX",
        ),
        ("RSS under load <= 70 MB", full.peak_rss_kb <= 70 * 1024, f"{full.peak_rss_kb / 1024:.0f} MB"),
        ("1 ID token minted per audience", minted == 1, f"{minted} for {calls:,} calls"),
    ]
    print()
    print(table(["target", "met", "measured"], [[n, "yes" if ok else "NO", m] for n, ok, m in targets]))
    print()
    print(f"full-featured/raw: {full.rate / raw.rate:.2f}")
    return 0


async def layers(args: argparse.Namespace) -> int:
    """ping.Send with the mesh's layers added one at a time: what each costs per call, in one run."""
    bench = await started(args)
    fx = bench.fx
    h2c = fx.h2c(fx.featured_env("ping"))
    steps: list[tuple[str, list[str], dict[str, str], bool, str | None]] = [
        ("raw grpc.aio (h2c, no interceptors)", RAW_PING, fx.base_env(), False, None)
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


def step(name: str) -> None:
    print(f"... {name}", flush=True)


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
    args = parser.parse_args()
    mode = layers if args.layers else operating if args.operating else run
    sys.exit(asyncio.run(mode(args)))


if __name__ == "__main__":
    main()
