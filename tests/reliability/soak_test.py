"""A bounded soak at saturation on loopback: ping.Send, routeguide.ListFeatures and aggregator.Survey through the
mesh as on Cloud Run (TLS, ID tokens from the metadata servers, verification, allow-lists), from concurrent
workers. Zero errors; each process's RSS grows under 10 %; its descriptors come back to the baseline.

RELIABILITY_SOAK_SECONDS sets the duration (default 5 s, for CI; the issue's soak is 60 s:
`RELIABILITY_SOAK_SECONDS=60`). RELIABILITY_FIGURES names a file to append the figures to (JSON lines)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc

from aggregator.v1 import aggregator_pb2
from emulators.dev_ca import DevCerts
from emulators.identity import IdentityEmulator
from ping import ping_pb2
from routeguide.route_guide_pb2 import Point, Rectangle
from tests.reliability import calls
from tests.reliability.figures import report
from tests.reliability.processes import Usage
from tests.reliability.stack import DEVELOPER, Stack, audience, start_secure

SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "5"))
WORKERS = 8  # concurrent calls per kind
AREA = Rectangle(
    lo=Point(latitude=405_000_000, longitude=-750_000_000),
    hi=Point(latitude=415_000_000, longitude=-740_000_000),
)
ROUTE = [Point(latitude=410_000_000 + i * 1000, longitude=-745_000_000) for i in range(10)]


async def soak(
    stack: Stack, emulator: IdentityEmulator, certs: DevCerts, seconds: float
) -> tuple[Counter[str], list[str]]:
    """Calls of each kind back to back from WORKERS workers each, for `seconds`; counts and errors."""
    token = {name: emulator.mint(DEVELOPER, audience(name)) for name in ("ping", "routeguide", "aggregator")}
    channels = {s.name: calls.tls(s.port, certs, token[s.name]) for s in stack.all}
    pinger, guide, agg = (
        calls.ping(channels["ping"]),
        calls.routeguide(channels["routeguide"]),
        calls.aggregator(channels["aggregator"]),
    )

    async def send() -> None:
        await pinger.Send(ping_pb2.Request(message="soak"), timeout=10)

    async def list_features() -> None:
        found = [f async for f in guide.ListFeatures(AREA, timeout=10)]
        assert found

    async def survey() -> None:
        reply = await agg.Survey(
            aggregator_pb2.SurveyRequest(message="soak", area=AREA, route=ROUTE), timeout=10
        )
        if [c.code for c in reply.calls] != [0, 0, 0]:
            raise RuntimeError(f"partial survey: {list(reply.calls)}")

    counts: Counter[str] = Counter()
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker(name: str, call: Callable[[], Awaitable[None]]) -> None:
        while loop.time() < end:
            try:
                await call()
                counts[name] += 1
            except (grpc.aio.AioRpcError, RuntimeError, AssertionError) as err:
                errors.append(f"{name}: {err}")

    kinds = {"ping.Send": send, "routeguide.ListFeatures": list_features, "aggregator.Survey": survey}
    try:
        await asyncio.gather(*(worker(n, c) for n, c in kinds.items() for _ in range(WORKERS)))
    finally:
        for channel in channels.values():
            await channel.close()
    return counts, errors


async def settled(stack: Stack, baseline: dict[str, Usage], timeout: float = 10) -> dict[str, Usage]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        now = {s.name: s.usage() for s in stack.all}
        if all(now[n].fds <= baseline[n].fds for n in now) or loop.time() > deadline:
            return now
        await asyncio.sleep(0.2)


async def test_soak_has_no_errors_and_no_growth(certs: DevCerts) -> None:
    with IdentityEmulator() as emulator:
        stack = await start_secure(emulator, certs)
        try:
            await soak(
                stack, emulator, certs, min(2.0, SECONDS)
            )  # warm-up: connections, tokens, caches, arenas
            before = await settled(stack, {s.name: s.usage() for s in stack.all})
            started = time.perf_counter()
            counts, errors = await soak(stack, emulator, certs, SECONDS)
            elapsed = time.perf_counter() - started
            after = await settled(stack, before)
        finally:
            codes = await stack.stop()
    figures = {
        "seconds": round(elapsed, 1),
        "requests": dict(counts),
        "total": sum(counts.values()),
        "rate_per_s": round(sum(counts.values()) / elapsed),
        "errors": len(errors),
        "rss_kb": {n: [before[n].rss_kb, after[n].rss_kb] for n in before},
        "fds": {n: [before[n].fds, after[n].fds] for n in before},
        "threads": {n: [before[n].threads, after[n].threads] for n in before},
    }
    report("soak", figures)
    assert errors == [], errors[:10]
    assert codes == {"aggregator": 0, "ping": 0, "routeguide": 0}
    assert all(counts[k] > 0 for k in ("ping.Send", "routeguide.ListFeatures", "aggregator.Survey")), counts
    for name in before:
        assert after[name].rss_kb < before[name].rss_kb * 1.10, (name, before[name], after[name])
        assert after[name].fds <= before[name].fds, (name, before[name], after[name])
