"""`aggregator survey|tour`: aggregator.v1.Aggregator, the mesh's own API over ping and routeguide."""

from __future__ import annotations

import argparse
from typing import cast

import grpc

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from services.cli import arguments, output
from services.cli.command import Subcommands
from services.cli.output import Printer


def register(services: Subcommands) -> None:
    aggregator = services.add_parser("aggregator", help="aggregator.v1.Aggregator (points in degrees x 1e7)")
    commands = aggregator.add_subparsers(dest="rpc", required=True, metavar="RPC")

    survey_parser = commands.add_parser(
        "survey", help="Survey: ping, features in an area and a route at once"
    )
    survey_parser.add_argument("--message", required=True, help="text for ping.Send")
    survey_parser.add_argument(
        "--area", required=True, metavar="LO_LAT,LO_LON,HI_LAT,HI_LON", type=arguments.rectangle
    )
    survey_parser.add_argument("--route", metavar="LAT,LON", nargs="*", default=[], type=arguments.point)
    survey_parser.set_defaults(command=survey)

    tour_parser = commands.add_parser("tour", help="Tour: the feature at each stop and earlier notes there")
    tour_parser.add_argument("stops", metavar="LAT,LON[:note]", nargs="+", type=arguments.stop)
    tour_parser.set_defaults(command=tour)


def _stub(channel: grpc.aio.Channel) -> aggregator_pb2_grpc.AggregatorAsyncStub:
    return cast("aggregator_pb2_grpc.AggregatorAsyncStub", aggregator_pb2_grpc.AggregatorStub(channel))


async def survey(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    request = aggregator_pb2.SurveyRequest(message=args.message, area=args.area, route=args.route)
    printer.result(await _stub(channel).Survey(request, timeout=args.timeout), output.survey)


async def tour(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    async for update in _stub(channel).Tour(iter(args.stops), timeout=args.timeout):
        printer.result(update, output.tour_update)
