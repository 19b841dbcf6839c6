"""The baseline: the same servicers and generated stubs on a bare grpc.aio server, h2c, no interceptors,
no health or reflection. `python -m tests.bench.raw_server ping|routeguide` prints {"event": "serving", "port": N}.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import grpc

from ping import ping_pb2_grpc
from routeguide import route_guide_pb2_grpc
from services.ping.servicer import PingServicer
from services.routeguide.features import generated_database
from services.routeguide.servicer import RouteGuideServicer


async def serve(kind: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if kind == "ping":
        ping_pb2_grpc.add_PingServiceServicer_to_server(PingServicer(), server)
    elif kind == "routeguide":
        route_guide_pb2_grpc.add_RouteGuideServicer_to_server(
            RouteGuideServicer(generated_database()), server
        )
    else:
        raise SystemExit(f"unknown raw server {kind!r}; use ping or routeguide")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "ping"))
