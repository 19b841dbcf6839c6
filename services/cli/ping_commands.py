"""`ping send --message M [--relay]`: PingService.Send, or SendUpstream through the server's upstream."""

from __future__ import annotations

import argparse
from typing import cast

import grpc

from ping import ping_pb2, ping_pb2_grpc
from services.cli import output
from services.cli.command import Subcommands
from services.cli.output import Printer


def register(services: Subcommands) -> None:
    ping = services.add_parser("ping", help="ping.PingService (the grpc-ping sample)")
    commands = ping.add_subparsers(dest="rpc", required=True, metavar="RPC")
    send_parser = commands.add_parser("send", help="Send (or SendUpstream with --relay)")
    send_parser.add_argument("--message", required=True, help="text to echo")
    send_parser.add_argument(
        "--relay", action="store_true", help="ask the server to relay it to its upstream"
    )
    send_parser.set_defaults(command=send)


async def send(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    stub = cast("ping_pb2_grpc.PingServiceAsyncStub", ping_pb2_grpc.PingServiceStub(channel))
    rpc = stub.SendUpstream if args.relay else stub.Send
    response = await rpc(ping_pb2.Request(message=args.message), timeout=args.timeout)
    printer.result(response, output.pong)
