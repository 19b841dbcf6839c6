"""The mesh's command-line client: `cli --server HOST:PORT [flags] SERVICE RPC [args]`.

Exit status: 0 on success, 1 when the call fails (`error: CODE: message` on stderr), 2 for bad arguments or
a wrong MESH_CONNECT_TO, 141 (as if killed by SIGPIPE) when the reader of its output goes away (`| head`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from mesh import ConfigError, NoCredentialsError
from services.cli import aggregator_commands, arguments, connection, ping_commands, routeguide_commands
from services.cli.command import Command
from services.cli.output import Printer, error_line

DEFAULT_TIMEOUT_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = arguments.Parser(
        prog="cli",
        description="Call the mesh's services (ping, routeguide, aggregator). Points are degrees x 1e7.",
        epilog="By default the call uses TLS (system roots) and an ID token for https://HOST. "
        "MESH_CONNECT_TO=.run.app=127.0.0.1:PORT dials run.app names at the local Cloud Run's front end.",
    )
    parser.add_argument("--server", required=True, type=arguments.server_address, help="HOST:PORT to call")
    parser.add_argument("--insecure", action="store_true", help="plaintext h2c (local development; no token)")
    parser.add_argument("--ca", type=arguments.readable_file, metavar="FILE", help="root CA for TLS (PEM)")
    parser.add_argument(
        "--server-host", metavar="NAME", help="authority and TLS name to present instead of the --server host"
    )
    parser.add_argument("--unauthenticated", action="store_true", help="send no ID token")
    parser.add_argument("--audience", metavar="AUD", help="ID-token audience (default https://HOST)")
    parser.add_argument(
        "--timeout",
        type=arguments.seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"deadline of the call, streams included (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument("--json", action="store_true", help="print each result as one line of JSON")
    services = parser.add_subparsers(dest="service", required=True, metavar="SERVICE")
    ping_commands.register(services)
    routeguide_commands.register(services)
    aggregator_commands.register(services)
    return parser


async def run(args: argparse.Namespace) -> int:
    """Makes the call the arguments describe; returns the exit status."""
    try:
        target = connection.upstream(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    channels = connection.channels_for(target)
    try:
        channel = channels.open(target, idempotent=connection.IDEMPOTENT)
        command: Command = args.command  # set by the chosen subcommand's parser
        await command(channel, args, Printer(args.json))
    except grpc.aio.AioRpcError as err:
        print(error_line(err.code(), err.details()), file=sys.stderr)
        return 1
    except NoCredentialsError as err:  # its message names the ways to get an identity, never a token
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        await channels.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argparse exits 2 on bad arguments) and runs the call."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): end quietly, like a Unix tool. Python flushes stdout again at exit,
        # which would raise once more, so stdout now points at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
