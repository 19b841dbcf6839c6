"""The shape every subcommand shares: an async function of the open channel, the parsed arguments and the
printer. Each *_commands module registers its subcommands with `set_defaults(command=...)`."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

import grpc

from services.cli.output import Printer

Command = Callable[[grpc.aio.Channel, argparse.Namespace, Printer], Awaitable[None]]

# argparse's handle on a group of subcommands (`parser.add_subparsers()`).
Subcommands = argparse._SubParsersAction  # argparse exposes no public name for it
