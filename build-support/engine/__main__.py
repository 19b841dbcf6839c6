"""The engine tooling's command line (stdlib only; .ci/run, tests and developers share it):

    PYTHONPATH=build-support python3 -m engine ensure [--shell]   # an engine; --shell: `export` lines for eval
    PYTHONPATH=build-support python3 -m engine base [--force]     # the python:3.11-slim-bookworm stand-in
    PYTHONPATH=build-support python3 -m engine stop               # stop the private dockerd, unmount its state
    PYTHONPATH=build-support python3 -m engine package [SPECS]    # ./pants package, images only with an engine

Exit status 3 when there is no engine and no means to start one (the one line on stderr says why).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from engine import base_image, daemon

NO_ENGINE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser("ensure", help="find or start an engine")
    ensure.add_argument("--shell", action="store_true", help="print export lines for the caller's shell")
    base = commands.add_parser(
        "base", help="ensure the base image (built from Debian when it cannot be pulled)"
    )
    base.add_argument(
        "--force", action="store_true", help="rebuild the stand-in even if its recipe is unchanged"
    )
    commands.add_parser("stop", help="stop the private dockerd, if one runs")
    package = commands.add_parser(
        "package", help="./pants package SPECS; the docker_image targets need an engine"
    )
    package.add_argument("specs", nargs="*", default=["::"])
    args = parser.parse_args(argv)

    if args.command == "stop":
        stopped = daemon.stop()
        print(
            f"engine: {'private dockerd stopped' if stopped else 'no private dockerd running'}",
            file=sys.stderr,
        )
        return 0
    began = time.monotonic()
    try:
        engine = daemon.ensure()
    except daemon.NoEngine as e:
        if args.command == "package":
            print(f"engine: {e}; packaging without the docker_image targets", file=sys.stderr)
            return pants(["--filter-target-type=-docker_image", "package", *args.specs], {})
        print(f"engine: {e}", file=sys.stderr)
        return NO_ENGINE
    how = "started" if engine.started else "found"
    print(f"engine: {how} {engine.host} ({time.monotonic() - began:.1f} s)", file=sys.stderr)
    if args.command == "ensure":
        if args.shell:
            for name, value in {**engine.env(), "ENGINE_STARTED": "1" if engine.started else ""}.items():
                print(f"export {name}={shlex.quote(value)}")
        return 0
    try:
        result = base_image.ensure(engine, force=getattr(args, "force", False))
        print(f"engine: base image {base_image.TAG}: {result}", file=sys.stderr)
        if args.command == "package":
            return pants(["package", *args.specs], engine.env())
    finally:
        if engine.started:  # the images stay in its state folder for the next start
            daemon.stop()
    return 0


def pants(argv: list[str], env: dict[str, str]) -> int:
    """./pants from the repository's root (this file is build-support/engine/__main__.py)."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [str(root / "pants"), *argv], cwd=root, env={**os.environ, **env}, check=False
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
