"""Starts the local mesh: the span and metrics receiver, the identity emulator with the plan's accounts, then
the local Cloud Run (cloudrun.platform: Envoy as the front end, instances by concurrency) with each service's
rendered manifest, callees first (localmesh.plan). Instances run the production way (h2c on $PORT, no TLS of
their own); only their telemetry differs: it goes to the launcher (`telemetry`), not to Cloud Trace.

Images (`images`, e.g. {"ping": "ping:dev"}): the manifest names the image by the local image's ID
(`mesh.local/ping@sha256:<ID>`), and the instances run that ID. A local build is never pushed, so it has no
registry digest; its ID is the hash of its configuration, which names its layers: the same guarantee a digest
gives. Running by ID also means a rebuild that moves the `ping:dev` tag while the mesh runs changes nothing
that is deployed, as a pushed tag cannot change a Cloud Run revision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc

from cloudrun import runners
from cloudrun.autoscaler import Instance
from cloudrun.child import child_env
from cloudrun.manifest import RevisionSpec
from cloudrun.platform import CloudRun
from emulators.identity import IdentityEmulator
from localmesh.calls import CallStore, add_receiver
from localmesh.plan import PROJECT_ID, PROJECT_NUMBER, REGION, Plan, find_root, source_image, templates
from localmesh.processes import COLOURS, RESET, readable
from localmesh.spans import SpanStore, start_receiver


def write_cli(path: Path, env: Mapping[str, str]) -> None:
    """An executable at `path` that runs the CLI (services.cli.main) with this interpreter, this import path and
    `env` (the developer's metadata server, MESH_CONNECT_TO and TLS_CA_FILE: `--server NAME.run.app:443`
    reaches the front end): commands that use it answer in a second terminal while the mesh runs, where
    `./pants run` would wait on the lock the running mesh holds. `env` holds the developer's metadata secret,
    so only the developer's user may read or run it (made so before anything is written)."""
    settings = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    script = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with open(script, "w", encoding="utf-8") as out:
        out.write(
            "#!/bin/sh\n"
            "# Written by the local mesh when it started, removed when it stops: the CLI, as the mesh's "
            "developer.\n"
            f"{settings}exec {shlex.quote(sys.executable)} -m services.cli.main"
            ' --ca "$TLS_CA_FILE" "$@"\n'
        )


class Mesh:
    """Owner of everything the local mesh runs; `async with Mesh(...) as mesh:` stops it all on exit."""

    def __init__(
        self,
        state_dir: Path,
        *,
        root: Path | None = None,
        only: Sequence[str] = (),
        echo: Callable[[str], None] | None = None,
        colour: bool = False,
        images: Mapping[str, str] | None = None,
        docker_env: Mapping[str, str] | None = None,
        env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """`images`: folder -> local image (run from images with `docker_env`); None: from source. `env`: extra
        settings by service (tests: a service started wrong), added to its manifest's env."""
        self.state_dir, self.root, self.echo, self.colour = state_dir, root or find_root(), echo, colour
        self._only, self._images, self._docker_env = list(only), images, docker_env
        self._extra = {k: dict(v) for k, v in (env or {}).items()}
        self.spans = SpanStore()
        self.calls = CallStore()
        self.identity = IdentityEmulator(project_id=PROJECT_ID)
        self.cli = state_dir / "cli"  # the CLI as the developer, while the mesh runs (write_cli)
        self.plan: Plan | None = None
        self.run: CloudRun | None = None
        self.deployed: dict[str, str] = {}  # service -> its revision, in start order
        self.started: list[tuple[str, Instance]] = []  # every instance, by service
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

    # -- what a caller needs ----------------------------------------------------------------------------------
    @property
    def front(self) -> str:
        """The front end's loopback address (every run.app name is served there)."""
        assert self.run is not None
        return self.run.front.address

    @property
    def ca_file(self) -> Path:
        assert self.run is not None
        return self.run.ca_file

    @property
    def developer(self) -> str:
        assert self.plan is not None
        return self.plan.developer

    def host(self, service: str) -> str:
        assert self.plan is not None
        return self.plan[service].host

    def audience(self, service: str) -> str:
        assert self.plan is not None
        return self.plan[service].audience

    def account(self, service: str) -> str:
        assert self.plan is not None
        return self.plan[service].spec.service_account

    def connect_to(self) -> dict[str, str]:
        """What a process needs to reach the services by name: the front end and its CA."""
        return {"MESH_CONNECT_TO": f".run.app={self.front}", "TLS_CA_FILE": str(self.ca_file)}

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        images = await asyncio.to_thread(self._images_by_digest)
        self.plan = Plan.load(self.root, images, self._only)
        self.identity.start()
        for account in [self.plan.developer, *(s.spec.service_account for s in self.plan.services)]:
            self.identity.add_account(account)
        self._receiver, self._receiver_port = await start_receiver(
            self.spans, lambda server: add_receiver(self.calls, server)
        )
        self.run = await asyncio.to_thread(
            CloudRun,
            self.state_dir,
            project_number=PROJECT_NUMBER,
            region=REGION,
            runner=self._runner,
            identity=self.identity,
            say=self._say,
        )
        for service in self.plan.services:  # callees first: a caller's first call finds them serving
            self.deployed[service.name] = await asyncio.to_thread(self.run.replace, service.manifest)
        cli_env = {
            "PYTHONPATH": child_env({})["PYTHONPATH"],
            **self.identity.env_for(self.plan.developer),
            **self.connect_to(),
        }
        await asyncio.to_thread(write_cli, self.cli, cli_env)

    async def stop(self) -> dict[str, int | None]:
        """Every instance stopped (out of the front end first, then SIGTERM and its drain), then the front end,
        the receiver (after the instances' last exports) and the emulator; each instance's exit code."""
        if self.run is not None:
            await asyncio.to_thread(self.run.close)
            self.run = None
        codes: dict[str, int | None] = {}
        for service, instance in self.started:
            code = await asyncio.to_thread(instance.stop)  # already stopped: its exit code
            if codes.get(service) in (0, None):
                codes[service] = code
        if self._receiver is not None:
            await self._receiver.stop(None)
            self._receiver = None
        self.identity.stop()
        self.cli.unlink(missing_ok=True)
        return codes

    # -- how --------------------------------------------------------------------------------------------------
    def _images_by_digest(self) -> dict[str, str]:
        folders = {folder for folder, _ in templates(self.root).values()}
        if self._images is None:
            return {folder: source_image(self.root, folder) for folder in folders}
        found = {}
        for folder in folders:
            image_id = _docker(
                self._docker_env, "image", "inspect", "--format", "{{.Id}}", self._images[folder]
            )
            found[folder] = f"mesh.local/{folder}@{image_id}"
        return found

    def _runner(self, revision: runners.Revision) -> runners.Launcher:
        """The platform's runner for one revision: from source or by image ID, telemetry to the launcher, every
        instance it starts kept (for its exit code)."""
        service = revision.spec.service
        revision = dataclasses.replace(revision, env={**revision.env, **self._extra.get(service, {})})
        on_line = self._echo_for(service)
        if self._images is None:
            launch = runners.from_source(revision, on_line=on_line, extra_env=self.telemetry)
        else:
            by_id = dataclasses.replace(revision.spec, image=revision.spec.image.split("@", 1)[1])
            launch = runners.from_image(
                dataclasses.replace(revision, spec=by_id),
                self._docker_env or {},
                on_line=on_line,
                extra_env=self.telemetry,
            )

        def started() -> Instance:
            instance = launch()
            self.started.append((service, instance))
            return instance

        return started

    def telemetry(self, spec: RevisionSpec) -> dict[str, str]:
        """Every span and the RED metrics to the launcher's OTLP receiver, at once (the manifests send a
        sample of them to Cloud Trace and Cloud Monitoring, which are not emulated)."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self._receiver_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # spans reach the launcher within a blink
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }

    def _echo_for(self, service: str) -> runners.Lines | None:
        if self.echo is None:
            return None
        assert self.plan is not None
        index = [s.name for s in self.plan.services].index(service)
        colour = COLOURS[index % len(COLOURS)] if self.colour else ""
        prefix = f"{colour}{service:<13}{RESET if colour else ''}|"
        echo = self.echo
        return lambda revision, line: echo(f"{prefix} {readable(line)}")

    def _say(self, line: str) -> None:
        if self.echo is not None:
            self.echo(line)


def _docker(env: Mapping[str, str] | None, *argv: str) -> str:
    result = subprocess.run(
        ["docker", *argv], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    if result.returncode:
        raise ImageMissing(f"docker {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout.strip()


class ImageMissing(RuntimeError):
    """A local image the mesh should run is not there; the message says which."""
