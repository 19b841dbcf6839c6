"""`routeguide get|list|record|chat`: the four RouteGuide RPCs, points given as E7 integers."""

from __future__ import annotations

import argparse
from typing import cast

import grpc

from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.cli import arguments, output
from services.cli.command import Subcommands
from services.cli.output import Printer


def register(services: Subcommands) -> None:
    routes = services.add_parser("routeguide", help="routeguide.RouteGuide (points in degrees x 1e7)")
    commands = routes.add_subparsers(dest="rpc", required=True, metavar="RPC")

    get_parser = commands.add_parser("get", help="GetFeature: the feature at a point")
    get_parser.add_argument("latitude", metavar="LAT", type=arguments.e7)
    get_parser.add_argument("longitude", metavar="LON", type=arguments.e7)
    get_parser.set_defaults(command=get)

    list_parser = commands.add_parser("list", help="ListFeatures: every feature in a rectangle")
    for name in ("lo_lat", "lo_lon", "hi_lat", "hi_lon"):
        list_parser.add_argument(name, metavar=name.upper(), type=arguments.e7)
    list_parser.set_defaults(command=list_features)

    record_parser = commands.add_parser("record", help="RecordRoute: summarise a route")
    record_parser.add_argument("points", metavar="LAT,LON", nargs="+", type=arguments.point)
    record_parser.set_defaults(command=record)

    chat_parser = commands.add_parser("chat", help="RouteChat: post notes, print earlier notes at each place")
    chat_parser.add_argument("notes", metavar="LAT,LON:message", nargs="+", type=arguments.note)
    chat_parser.set_defaults(command=chat)


def _stub(channel: grpc.aio.Channel) -> route_guide_pb2_grpc.RouteGuideAsyncStub:
    return cast("route_guide_pb2_grpc.RouteGuideAsyncStub", route_guide_pb2_grpc.RouteGuideStub(channel))


async def get(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    where = route_guide_pb2.Point(latitude=args.latitude, longitude=args.longitude)
    printer.result(await _stub(channel).GetFeature(where, timeout=args.timeout), output.lookup)


async def list_features(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    area = route_guide_pb2.Rectangle(
        lo=route_guide_pb2.Point(latitude=args.lo_lat, longitude=args.lo_lon),
        hi=route_guide_pb2.Point(latitude=args.hi_lat, longitude=args.hi_lon),
    )
    async for found in _stub(channel).ListFeatures(area, timeout=args.timeout):
        printer.result(found, output.feature)


async def record(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    printer.result(await _stub(channel).RecordRoute(iter(args.points), timeout=args.timeout), output.summary)


async def chat(channel: grpc.aio.Channel, args: argparse.Namespace, printer: Printer) -> None:
    async for earlier in _stub(channel).RouteChat(iter(args.notes), timeout=args.timeout):
        printer.result(earlier, output.note)
