"""The baselines: PingService (Send only, answered by services.ping.servicer.pong) and RouteGuide on bare gRPC
servers, h2c, no interceptors, no health or reflection.

`python -m tests.bench.raw_server ping aio|uvloop|sync4|sync256` serves Send on grpc.aio (asyncio's loop or
uvloop's) or on a sync grpc.server with a thread pool of 4 or 256 workers; `raw_server routeguide` serves
RouteGuide on grpc.aio. Each prints {"event": "serving", "port": N}. tests/bench/naive_server.py builds on the
sync pieces.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
import uvloop

from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2_grpc
from services.ping.servicer import pong
from services.routeguide.features import generated_database
from services.routeguide.servicer import RouteGuideServicer

OPTIONS = [("grpc.so_reuseport", 0)]
SYNC_WORKERS = {"sync4": 4, "sync256": 256}  # 256: a pool that holds the 250 streams service.yaml allows
USAGE = f"usage: raw_server ping {{aio,uvloop,{','.join(SYNC_WORKERS)}}} | raw_server routeguide"


# Send only: SendUpstream stays the generated base's UNIMPLEMENTED (mypy-protobuf marks it abstract).
class AsyncPing(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        return pong(request)


class SyncPing(ping_pb2_grpc.PingServiceServicer):
    def Send(self, request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
        return pong(request)


def announce(port: int) -> None:
    print(json.dumps({"event": "serving", "port": port}), flush=True)


def sync_server(workers: int, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> grpc.Server:
    """gRPC's sync example: a thread pool of `workers`, serving SyncPing."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors, options=OPTIONS
    )
    ping_pb2_grpc.add_PingServiceServicer_to_server(SyncPing(), server)  # type: ignore[abstract]
    return server


def run_sync(server: grpc.Server, port: int) -> None:
    """Starts `server` (its port already added), announces it, and serves until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    announce(port)
    stop.wait()
    server.stop(1).wait()


async def run_aio(kind: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    if kind == "ping":
        ping_pb2_grpc.add_PingServiceServicer_to_server(AsyncPing(), server)  # type: ignore[abstract]
    else:
        route_guide_pb2_grpc.add_RouteGuideServicer_to_server(
            RouteGuideServicer(generated_database()), server
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str]) -> None:
    kind, model = (argv + ["", ""])[:2]
    if kind == "routeguide" and not model:
        asyncio.run(run_aio("routeguide"))
    elif kind == "ping" and model == "aio":
        asyncio.run(run_aio("ping"))
    elif kind == "ping" and model == "uvloop":
        uvloop.run(run_aio("ping"))
    elif kind == "ping" and model in SYNC_WORKERS:
        server = sync_server(SYNC_WORKERS[model])
        run_sync(server, server.add_insecure_port("127.0.0.1:0"))
    else:
        raise SystemExit(USAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
