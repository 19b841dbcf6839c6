"""The ping service built up one mesh layer at a time, to see what each costs (`bench --layers`).

`python -m tests.bench.layered_server LAYER` serves PingService on 127.0.0.1 with every layer up to LAYER
(see LAYERS) and prints {"event": "serving", "port": N}. It is assembled from the same pieces as the
service process (mesh.serving.start, mesh.server.ServerChain), configured from the same variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider

from mesh import propagation, serving
from mesh.server import ServerChain
from mesh.settings import AuthSettings, ServerSettings
from ping import ping_pb2_grpc
from services.ping.main import MODEL
from services.ping.servicer import PingServicer

# Each layer includes the ones before it.
LAYERS = {
    "runtime": "mesh server: health, reflection, server options, concurrency limit",
    "deadline": "+ the chain's wrapper per method, recording the deadline",
    "token": "+ an ID token in every request (not verified)",
    "verified": "+ the token verified (allow-list; verified-token cache)",
    "traced": "+ a server span per call (Cloud Run's unsampled traceparent; production sampler)",
}


def chain(layer: str, env: dict[str, str]) -> ServerChain | None:
    reached = list(LAYERS).index(layer)
    if reached < list(LAYERS).index("deadline"):
        return None
    provider = None
    if reached >= list(LAYERS).index("traced"):
        propagate.set_global_textmap(propagation.propagator_from_env(env))
        provider = TracerProvider()  # the sampler from OTEL_TRACES_SAMPLER[_ARG]; nothing exported
    auth = AuthSettings.from_env(env) if reached >= list(LAYERS).index("verified") else AuthSettings()
    return serving.server_chain(provider, auth)


async def serve(layer: str) -> None:
    settings = ServerSettings(service="ping", port=0, bind_host="127.0.0.1")
    services = [
        serving.Service(
            "ping.PingService", PingServicer(), ping_pb2_grpc.add_PingServiceServicer_to_server, model=MODEL
        )
    ]
    running = await serving.start(services, settings, chain=chain(layer, dict(os.environ)))
    print(json.dumps({"event": "serving", "port": running.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(1)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in LAYERS:
        raise SystemExit(f"usage: layered_server {{{','.join(LAYERS)}}}")
    asyncio.run(serve(sys.argv[1]))
