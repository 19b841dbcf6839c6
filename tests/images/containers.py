"""Service containers run the way Cloud Run runs them, on the engine build-support/engine ensured.

Cloud Run's contract: cloudrun.runners.CLOUD_RUN_FLAGS (the same flags as the container mesh), and only PORT
(plus the service's own upstream settings) in the environment. The private engine has no bridge, so each
container shares the host's network and gets a free port of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudrun.runners import CLOUD_RUN_FLAGS
from engine import daemon
from engine.daemon import Engine
from mesh.testing import NO_REUSEPORT

BUILD_SCRIPT = Path("build-support/engine/build_image.sh")
SERVING = health_pb2.HealthCheckResponse.SERVING


def engine_or_skip() -> Engine:
    """The container engine (build-support/engine), or the test skipped with the one line saying why; under
    REQUIRE_IMAGE_TESTS=1 (set by .ci/run) a failure instead, so that CI never passes by skipping."""
    try:
        return daemon.ensure()
    except daemon.NoEngine as e:
        if os.environ.get("REQUIRE_IMAGE_TESTS") == "1":
            pytest.fail(f"REQUIRE_IMAGE_TESTS=1 but {e}", pytrace=False)
        pytest.skip(str(e))


@dataclass(frozen=True)
class ServiceImage:
    service: str
    tag: str
    grpc_service: str  # the name grpc.health reports SERVING for


def build_image(engine: Engine, service: str, grpc_service: str, pex: Path, scratch: Path) -> ServiceImage:
    """The service's image from its packaged PEX, with the script Cloud Build uses; the context holds only
    that PEX, at the path Pants' and Cloud Build's contexts hold it."""
    context = scratch / f"context-{service}"
    (context / f"services.{service}").mkdir(parents=True)
    shutil.copy(pex, context / f"services.{service}" / f"{service}.pex")
    tag = f"mesh-images-test/{service}:latest"
    subprocess.run(
        ["bash", str(BUILD_SCRIPT), service, tag, str(context)],
        env=engine.docker_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return ServiceImage(service, tag, grpc_service)


def free_port() -> int:
    """A port free on loopback now (the container binds it on the shared host network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Container:
    engine: Engine
    image: ServiceImage
    port: int
    name: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address, options=NO_REUSEPORT)

    def inspect(self, template: str) -> str:
        return self.engine.docker("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = self.engine.docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *argv: str) -> str:
        return self.engine.docker("exec", self.name, *argv).stdout

    async def stop(self, timeout: int = 10) -> float:
        """`docker stop` (SIGTERM, SIGKILL after timeout s, as Cloud Run does); its duration in seconds."""
        began = time.monotonic()
        stopping = await asyncio.create_subprocess_exec(
            "docker",
            "stop",
            f"--time={timeout}",
            self.name,
            env=self.engine.docker_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.wait_for(stopping.wait(), timeout + 20)
        return time.monotonic() - began

    def remove(self) -> None:
        self.engine.docker("rm", "--force", self.name, check=False)


def run(engine: Engine, image: ServiceImage, settings: Mapping[str, str] | None = None) -> Container:
    """Start a container of image with only PORT and settings set (-e adds to the image's own ENV)."""
    port = free_port()
    name = f"mesh-images-test-{image.service}-{uuid.uuid4().hex[:8]}"
    env = [f"--env={key}={value}" for key, value in {"PORT": str(port), **(settings or {})}.items()]
    engine.docker("run", "--detach", f"--name={name}", *CLOUD_RUN_FLAGS, *env, image.tag)
    return Container(engine, image, port, name)


async def wait_serving(container: Container, timeout: float = 30.0) -> None:
    """Until grpc.health answers SERVING for the container's service (the container must keep running)."""
    deadline = time.monotonic() + timeout
    async with container.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                request = health_pb2.HealthCheckRequest(service=container.image.grpc_service)
                reply = await health.Check(request, timeout=1, wait_for_ready=True)
                if reply.status == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline or container.inspect("{{.State.Running}}") != "true":
                raise AssertionError(
                    f"{container.name} did not serve within {timeout} s:\n{container.logs()}"
                )
            await asyncio.sleep(0.1)
