"""The engine tooling's command line (stdlib only; .ci/run, tests and developers share it):

    PYTHONPATH=build-support python3 -m engine ensure [--shell]   # an engine; --shell: `export` lines for eval
    PYTHONPATH=build-support python3 -m engine base [--force]     # the python:3.11-slim-bookworm stand-in
    PYTHONPATH=build-support python3 -m engine stop               # stop the private dockerd, unmount its state

Exit status 3 when there is no engine and no means to start one (the one line on stderr says why).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

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
        result = base_image.ensure(engine, force=args.force)
        print(f"engine: base image {base_image.TAG}: {result}", file=sys.stderr)
    finally:
        if engine.started:  # the images stay in its state folder for the next start
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
