"""Starts the local mesh: development CA, identity emulator, span receiver, then each service as a process."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator
from localmesh import containers, topology
from localmesh.calls import CallStore, add_receiver
from localmesh.processes import COLOURS, ServiceProcess, child_env, python_module
from localmesh.spans import SpanStore, start_receiver

# Where the services listen and are called: this machine only (their health and reflection take no token).
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Endpoint:
    name: str
    port: int

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def write_cli(path: Path, env: Mapping[str, str]) -> None:
    """An executable at `path` that runs the CLI (services.cli.main) with this interpreter, this import path and
    `env`: commands that use it answer in a second terminal while the mesh runs, where `./pants run` would
    wait on the lock that the running mesh holds. `env` holds the developer's metadata secret, so only the
    developer's user may read or run it (made so before anything is written)."""
    settings = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    script = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with open(script, "w", encoding="utf-8") as out:
        out.write(
            "#!/bin/sh\n"
            "# Written by the local mesh when it started, removed when it stops: the CLI, as the mesh's "
            "developer.\n"
            f'{settings} exec {shlex.quote(sys.executable)} -m services.cli.main "$@"\n'
        )


class Mesh:
    """Owner of everything the local mesh runs; `async with Mesh(...) as mesh:` stops it all on exit."""

    def __init__(
        self,
        state_dir: Path,
        *,
        only: Sequence[str] = (),
        echo: Callable[[str], None] | None = None,
        colour: bool = False,
        images: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        # Role -> image: each service runs in its own container (localmesh.containers) instead of a process.
        self.images = dict(images) if images else None
        self.specs = topology.with_dependencies(list(only)) if only else list(topology.SERVICES)
        self.echo = echo
        self.colour = colour
        self.spans = SpanStore()
        self.calls = CallStore()
        self.identity = IdentityEmulator(project_id=topology.PROJECT)
        self.certs: DevCerts | None = None
        self._served: DevCerts | None = None  # the certificate files the services read
        self.cli = state_dir / "cli"  # the CLI as the developer, while the mesh runs (write_cli)
        self.processes: dict[str, ServiceProcess] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self._receiver: grpc.aio.Server | None = None
        self._receiver_port = 0

    async def __aenter__(self) -> Mesh:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.certs = await asyncio.to_thread(ensure_dev_certs, self.state_dir / "certs")
        self.identity.start()
        for name in [topology.DEVELOPER, *(topology.account(s.name) for s in self.specs)]:
            self.identity.add_account(name)
        self._receiver, self._receiver_port = await start_receiver(
            self.spans, lambda server: add_receiver(self.calls, server)
        )
        self._served = self.certs
        if self.images:  # a container reads copies made for its user, mounted read-only
            self._served = await asyncio.to_thread(
                containers.container_certs, self.certs, self.state_dir / "containers"
            )
        for index, spec in enumerate(self.specs):
            colour = COLOURS[index % len(COLOURS)] if self.colour else ""
            env = self.env_for(spec)
            argv = python_module(spec.module)
            if self.images:
                name = f"mesh-{spec.name}-{os.getpid()}"
                mount = self._served.ca_cert.parent
                argv = containers.run_argv(name, self.images[spec.name], self.service_env(spec), mount)
            process = ServiceProcess(spec.name, argv, env, colour=colour, echo=self.echo)
            self.processes[spec.name] = process
            port = await process.start()
            self.endpoints[spec.name] = Endpoint(spec.name, port)
        cli_env = {"PYTHONPATH": child_env({})["PYTHONPATH"], **self.identity.env_for(topology.DEVELOPER)}
        await asyncio.to_thread(write_cli, self.cli, cli_env)

    def env_for(self, spec: topology.Spec) -> dict[str, str]:
        """The service process's environment (for a container: the docker CLI's, which passes it on)."""
        return child_env(self.service_env(spec))

    def service_env(self, spec: topology.Spec) -> dict[str, str]:
        """What the service itself is configured with."""
        assert self._served is not None
        callers = [topology.DEVELOPER, *(topology.account(c) for c in spec.callers)]
        env = {
            "K_SERVICE": spec.name,
            "BIND_HOST": LOOPBACK,
            "TLS_CERT_FILE": str(self._served.server_cert),
            "TLS_KEY_FILE": str(self._served.server_key),
            "TLS_CA_FILE": str(self._served.ca_cert),
            "AUTH_AUDIENCE": topology.audience(spec.name),
            "AUTH_CERTS_URL": self.identity.certs_url,
            "AUTH_ALLOWED_CALLERS": ",".join(callers),
            "OTEL_SERVICE_NAME": spec.name,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self._receiver_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # spans reach the launcher within a blink
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_METRICS_EXPORTER": "otlp",  # to the same receiver: the launcher prints a table per method
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "GOOGLE_CLOUD_PROJECT": topology.PROJECT,
            **self.identity.env_for(topology.account(spec.name)),
            **dict(spec.env),
        }
        for variable, upstream in spec.upstreams:
            env[variable] = self.endpoints[upstream].address
            env[f"{variable}_AUDIENCE"] = topology.audience(upstream)
        return env

    async def restart(self, name: str) -> None:
        """Stop and start one service on the same port (its callers keep their channels)."""
        process = self.processes[name]
        await process.stop()
        await process.start(port=self.endpoints[name].port)

    async def stop(self) -> dict[str, int | None]:
        """Stop every service (callers first), then the emulator and receiver; returns exit codes."""
        codes: dict[str, int | None] = {}
        for name in reversed(list(self.processes)):
            codes[name] = await self.processes[name].stop()
        if self._receiver is not None:
            await self._receiver.stop(None)
            self._receiver = None
        self.identity.stop()
        self.cli.unlink(missing_ok=True)
        return codes
