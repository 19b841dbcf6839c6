"""`./pants run :mesh [-- --demo] [--only SERVICE ...] [--containers]`: the whole mesh on loopback, as on Cloud Run."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

from engine import daemon
from localmesh import calls, containers, demo, topology
from localmesh.launcher import Mesh
from localmesh.supervisor import StartError


def say(line: str) -> None:
    print(line, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the demo, then shut down")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo; just serve until Ctrl-C")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[s.name for s in topology.SERVICES],
        default=[],
        help="start only these services (and what they call)",
    )
    parser.add_argument(
        "--containers",
        action="store_true",
        help="run each service in its own image (NAME:dev, from `./pants package ::`) on a container engine",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("MESH_STATE_DIR", ".mesh")),
        help="where the development CA and certificates live (default .mesh/, gitignored)",
    )
    return parser.parse_args(argv)


def print_endpoints(mesh: Mesh) -> None:
    assert mesh.certs is not None
    say(
        "\nThe mesh is up (TLS with the dev CA, ID tokens from the local identity emulator, traces to the launcher):"
    )
    for name, endpoint in mesh.endpoints.items():
        say(f"  {name:<14} {endpoint.address:<16} audience {topology.audience(name)}")
    say("\nCall it as the developer with the CLI, for example (in another terminal, while the mesh runs):")
    examples = {
        "ping": "ping send --message hi --relay",
        "aggregator": "aggregator survey --message hi --area 400000000,-750000000,420000000,-730000000",
        "routeguide": "routeguide get 409146138 -746188906",
    }
    for name, command in examples.items():
        if name in mesh.endpoints:
            flags = (
                f"--server {mesh.endpoints[name].address} --ca {shlex.quote(str(mesh.certs.ca_cert))} "
                f"--audience {topology.audience(name)}"
            )
            say(f"  {shlex.quote(str(mesh.cli))} {flags} {command}")
    say("")


async def print_calls(mesh: Mesh, title: str, *, running: bool = True) -> None:
    """The services' call metrics (received over OTLP), one line per method; while the mesh runs, once the
    exports have settled (after it stopped, nothing more arrives)."""
    served = await mesh.calls.settled(quiet=0.7, timeout=3.0) if running else mesh.calls.calls()
    say(f"{title} (from the services' rpc.server.duration metrics):")
    for line in calls.table(served):
        say(f"  {line}")
    say("")


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    images = None
    if args.containers:
        try:
            images = container_images()
        except ContainerError as err:
            say(f"mesh: {err}")
            return 1
    mesh = Mesh(args.state_dir, only=args.only, echo=say, colour=sys.stdout.isatty(), images=images)
    status = 0
    try:
        await mesh.start()
        print_endpoints(mesh)
        full = {"aggregator", "ping", "routeguide", "ping-upstream"} <= set(mesh.endpoints)
        if not args.no_demo and full:
            await demo.run(mesh, say)
        if not args.demo:
            if not args.no_demo and full:
                await print_calls(mesh, "Calls served so far")
            say("Serving until Ctrl-C.")
            await _wait(stop, mesh)
    except StartError as err:
        say(f"mesh: {err}")
        status = 1
    finally:
        codes = await mesh.stop()
        if mesh.calls.calls():
            # Each service flushed its last points on SIGTERM, before mesh.stop returned.
            await print_calls(mesh, "Calls served while the mesh ran", running=False)
        crashed = {name: code for name, code in codes.items() if code not in (0, None)}
        if crashed:
            say(f"mesh: stopped; exit codes {crashed}")
            status = status or 1
        else:
            say("mesh: every service stopped cleanly")
    return status


class ContainerError(RuntimeError):
    """No engine, or an image missing; the message says what to do."""


def container_images() -> dict[str, str]:
    """The engine's address for the docker CLI (build-support/engine: DOCKER_HOST, the default socket or the
    private dockerd), and each role's image, which must exist."""
    try:
        engine = daemon.ensure(start=False)
    except daemon.NoEngine as err:
        raise ContainerError(f"{err}; start one: PYTHONPATH=build-support python3 -m engine ensure") from err
    os.environ.update(engine.env())
    images = containers.images()
    missing = sorted(
        {i for i in images.values() if engine.docker("image", "inspect", i, check=False).returncode}
    )
    if missing:
        raise ContainerError(f"no image {', '.join(missing)}: build them with ./pants package ::")
    return images


async def _wait(stop: asyncio.Event, mesh: Mesh) -> None:
    """Until Ctrl-C; a service that dies meanwhile is reported (the rest keep serving)."""
    reported: set[str] = set()
    while not stop.is_set():
        for name, process in mesh.processes.items():
            if process.returncode is not None and name not in reported:
                reported.add(name)
                say(f"mesh: {name} exited with status {process.returncode}")
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
