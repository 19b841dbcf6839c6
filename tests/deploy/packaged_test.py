"""Each service's packaged PEX, installed and started the way its image does it, serves health over h2c.

The image build runs `PEX_TOOLS=1 python3.11 SERVICE.pex venv --compile --rm all /app` and its entrypoint is
`/app/pex` with only PORT set (plus the service's own upstream or data settings): do exactly that here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from localmesh.processes import ServiceProcess

SERVICES = {
    "ping": ("ping.PingService", {}),
    "routeguide": ("routeguide.RouteGuide", {}),
    # The aggregator only dials its downstreams when called; any well-formed address lets it start.
    "aggregator": (
        "aggregator.v1.Aggregator",
        {"PING_ADDR": "127.0.0.1:9", "ROUTEGUIDE_ADDR": "127.0.0.1:9", "UPSTREAM_INSECURE": "true"},
    ),
}


def install(pex: Path, into: Path) -> Path:
    env = {**os.environ, "PEX_TOOLS": "1"}
    subprocess.run(
        [sys.executable, str(pex), "venv", "--compile", "--rm", "all", str(into)], check=True, env=env
    )
    return into / "pex"


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_packaged_service_answers_health_over_h2c(service: str, tmp_path: Path) -> None:
    name, settings = SERVICES[service]
    entrypoint = install(Path(f"services.{service}/{service}.pex"), tmp_path / "app")
    # Only what Cloud Run (and the service's manifest) would set: no PYTHONPATH, nothing from this test.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **settings}
    process = ServiceProcess(service, [str(entrypoint)], env)
    port = await process.start(port=0, timeout=30)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)]
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for target in ("", name):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=target), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert await process.stop() == 0  # SIGTERM drains and exits cleanly, as Cloud Run expects
