"""`./pants run :mesh [-- --demo] [--only SERVICE ...] [--containers] [--min-instances SERVICE=N]`: the mesh's
manifests deployed on the local Cloud Run, behind its front end, as on Cloud Run."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

from cloudrun.platform import CloudRunError, Row
from engine import daemon
from localmesh import calls, demo
from localmesh.launcher import ImageMissing, Mesh
from localmesh.plan import PlanError, find_root, templates

# Commands printed for the developer, by the service they call (only those the developer may invoke).
EXAMPLES = {
    "ping": "ping send --message hi --relay",
    "aggregator": "aggregator survey --message hi --area 400000000,-750000000,420000000,-730000000",
}
TABLE_EVERY_S = 1.0


def say(line: str) -> None:
    print(line, flush=True)


def scaling(text: str) -> tuple[str, int]:
    service, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not SERVICE=N")
    return service, int(count)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="run the demo, then shut down")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo; just serve until Ctrl-C")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(templates(find_root())),
        default=[],
        help="deploy only these services (and what they call)",
    )
    parser.add_argument(
        "--containers",
        action="store_true",
        help="run each service from its image (NAME:dev, from `./pants package services/::`) on a container engine",
    )
    for bound in ("min", "max"):
        parser.add_argument(
            f"--{bound}-instances",
            type=scaling,
            action="append",
            default=[],
            metavar="SERVICE=N",
            help=f"the service's {bound}imum instances (its manifest's {bound}Scale otherwise; min defaults to 1)",
        )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("MESH_STATE_DIR", ".mesh")),
        help="where the development CA and the CLI script live (default .mesh/, gitignored)",
    )
    return parser.parse_args(argv)


def print_endpoints(mesh: Mesh) -> None:
    say(f"\nThe mesh is up behind the front end at {mesh.front} (TLS with the dev CA for *.run.app names):")
    for service in mesh.deployed:
        say(f"  {service:<14} https://{mesh.host(service)}")
    say("\nCall it as the developer with the CLI, for example (in another terminal, while the mesh runs):")
    for service, command in EXAMPLES.items():
        if service in mesh.deployed:
            say(f"  {shlex.quote(str(mesh.cli))} --server {mesh.host(service)}:443 {command}")
    say("")


def table(rows: list[Row]) -> list[str]:
    """One line per revision: its share of the traffic, tags, instances and calls in flight."""
    lines = [("SERVICE", "REVISION", "TRAFFIC", "INSTANCES", "IN FLIGHT")]
    for row in rows:
        tags = f" ({', '.join(row.tags)})" if row.tags else ""
        lines.append(
            (row.service, row.revision, f"{row.percent}%{tags}", str(row.instances), str(row.in_flight))
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]


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
    images, docker_env = None, None
    if args.containers:
        try:
            engine = daemon.ensure(start=False)
        except daemon.NoEngine as err:
            say(f"mesh: {err}; start one: PYTHONPATH=build-support python3 -m engine ensure")
            return 1
        docker_env = engine.docker_env()
        images = {folder: f"{folder}:dev" for folder, _ in templates(find_root()).values()}
    mesh = Mesh(
        args.state_dir,
        only=args.only,
        echo=say,
        colour=sys.stdout.isatty(),
        images=images,
        docker_env=docker_env,
    )
    status = 0
    try:
        await mesh.start()
        assert mesh.run is not None
        for bound in ("min", "max"):
            for service, count in getattr(args, f"{bound}_instances"):
                await asyncio.to_thread(mesh.run.set_scaling, service, **{f"{bound}_instances": count})
        print_endpoints(mesh)
        full = set(EXAMPLES) <= set(mesh.deployed) and len(mesh.deployed) == len(templates(find_root()))
        if not args.no_demo and full:
            await demo.run(mesh, say)
        if not args.demo:
            if not args.no_demo and full:
                await print_calls(mesh, "Calls served so far")
            say("Serving until Ctrl-C; the revisions' instances and calls in flight, as they change:")
            await _wait(stop, mesh)
    except (CloudRunError, PlanError, ImageMissing, ValueError) as err:
        say(f"mesh: {err}")
        status = 1
    finally:
        codes = await mesh.stop()
        if mesh.calls.calls():
            # Each instance flushed its last points on SIGTERM, before mesh.stop returned.
            await print_calls(mesh, "Calls served while the mesh ran", running=False)
        crashed = {name: code for name, code in codes.items() if code not in (0, None)}
        if crashed:
            say(f"mesh: stopped; exit codes {crashed}")
            status = status or 1
        elif codes:
            say("mesh: every instance stopped cleanly")
    return status


async def _wait(stop: asyncio.Event, mesh: Mesh) -> None:
    """Until Ctrl-C, the live table (CloudRun.snapshot) printed again whenever it changes."""
    assert mesh.run is not None
    shown: list[Row] = []
    while not stop.is_set():
        rows = await asyncio.to_thread(mesh.run.snapshot)
        if rows != shown:
            shown = rows
            for line in table(rows):
                say(f"  {line}")
            say("")
        try:
            await asyncio.wait_for(stop.wait(), TABLE_EVERY_S)
        except asyncio.TimeoutError:
            pass


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
