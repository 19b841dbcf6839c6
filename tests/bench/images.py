"""Service images as Cloud Run starts them: each image's size, and its cold start (from `docker run` to the
first answered real RPC: ping Send, routeguide GetFeature, aggregator Survey against running ping and
routeguide containers), run with Cloud Run's flags (tests/images/containers.py).

    ./pants package services/ping:image services/routeguide:image services/aggregator:image
    ./pants run tests/bench:images -- [--runs 5] [--tag dev]

Uses the engine that build-support/engine finds (DOCKER_HOST, the default socket, or the private dockerd that
`PYTHONPATH=build-support python3 -m engine ensure` started). Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc

from engine import base_image, daemon
from mesh.testing import NO_REUSEPORT
from tests.bench.stats import median
from tests.images.containers import Container, ServiceImage, run, wait_serving
from tests.images.rpcs import FIRST_RPC, upstreams

GRPC_NAMES = {
    "ping": "ping.PingService",
    "routeguide": "routeguide.RouteGuide",
    "aggregator": "aggregator.v1.Aggregator",
}
# Retry the connection every few ms while the container starts (gRPC's default backoff starts at 1 s, which
# would be measured instead of the start-up).
FAST_RECONNECT = [
    *NO_REUSEPORT,
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]
START_TIMEOUT_S = 60.0


async def cold_start(engine: daemon.Engine, image: ServiceImage, settings: dict[str, str]) -> float:
    """Seconds from `docker run` to the first answered RPC of a fresh container of image."""
    began = time.monotonic()
    container = run(engine, image, settings)
    try:
        async with grpc.aio.insecure_channel(container.address, options=FAST_RECONNECT) as channel:
            await FIRST_RPC[image.service](channel, timeout=START_TIMEOUT_S, wait=True)
        return time.monotonic() - began
    finally:
        container.remove()


def size_mb(engine: daemon.Engine, tag: str) -> float:
    return int(engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout) / 1e6


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh containers per image (default 5)")
    parser.add_argument("--tag", default="dev", help="image tag to measure (Pants builds NAME:dev)")
    args = parser.parse_args()
    try:
        engine = daemon.ensure(start=False)
    except daemon.NoEngine as e:
        print(f"images bench: {e}; start one with `PYTHONPATH=build-support python3 -m engine ensure`")
        return 3
    images = {s: ServiceImage(s, f"{s}:{args.tag}", name) for s, name in GRPC_NAMES.items()}
    missing = [
        i.tag for i in images.values() if engine.docker("image", "inspect", i.tag, check=False).returncode
    ]
    if missing:
        print(
            f"images bench: no image {', '.join(missing)}; build them: ./pants package services/<svc>:image"
        )
        return 2

    # The aggregator's downstreams run for the whole benchmark; only the aggregator starts cold.
    downstreams: list[Container] = [run(engine, images["ping"]), run(engine, images["routeguide"])]
    try:
        for container in downstreams:
            await wait_serving(container)
        settings = {"ping": {}, "routeguide": {}, "aggregator": upstreams(*downstreams)}
        print(f"base {base_image.TAG}: {size_mb(engine, base_image.TAG):.0f} MB")
        print("| image | size | cold start to first RPC: median (min-max) |")
        print("|---|---|---|")
        for service, image in images.items():
            starts = [await cold_start(engine, image, settings[service]) for _ in range(args.runs)]
            print(
                f"| {image.tag} | {size_mb(engine, image.tag):.0f} MB | {median(starts):.2f} s "
                f"({min(starts):.2f}-{max(starts):.2f} s, {args.runs} runs) |"
            )
    finally:
        for container in downstreams:
            container.remove()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
