"""Argument types for the CLI: addresses, files, timeouts, and points written as E7 integers ("LAT,LON").

Each raises argparse.ArgumentTypeError with a message that says what was expected, so a bad argument ends
with argparse's usage line and exit status 2 before anything is dialled.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from aggregator.v1 import aggregator_pb2
from routeguide import route_guide_pb2

_INT32 = range(-(2**31), 2**31)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads "-338000000,1510000000" (a southern point) as a value, not an option.

    argparse only treats plain negative numbers as values; a point, area or note in the southern hemisphere
    starts with "-" too. The matcher is argparse's own hook for this (a private attribute, stable since 3.2).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*(:.*)?$|^-\d*\.\d+$")


def e7(text: str) -> int:
    """A coordinate in degrees x 1e7; the server checks the +-90/+-180 range (INVALID_ARGUMENT)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer coordinate (degrees x 1e7)") from None
    if value not in _INT32:
        raise argparse.ArgumentTypeError(f"{text!r} does not fit a 32-bit coordinate (degrees x 1e7)")
    return value


def _coordinates(text: str, count: int, shape: str) -> list[int]:
    parts = text.split(",")
    if len(parts) != count:
        raise argparse.ArgumentTypeError(f"{text!r} is not {shape} (integers, degrees x 1e7)")
    return [e7(part) for part in parts]


def point(text: str) -> route_guide_pb2.Point:
    """`LAT,LON`."""
    latitude, longitude = _coordinates(text, 2, "LAT,LON")
    return route_guide_pb2.Point(latitude=latitude, longitude=longitude)


def rectangle(text: str) -> route_guide_pb2.Rectangle:
    """`LO_LAT,LO_LON,HI_LAT,HI_LON`."""
    lo_lat, lo_lon, hi_lat, hi_lon = _coordinates(text, 4, "LO_LAT,LO_LON,HI_LAT,HI_LON")
    return route_guide_pb2.Rectangle(
        lo=route_guide_pb2.Point(latitude=lo_lat, longitude=lo_lon),
        hi=route_guide_pb2.Point(latitude=hi_lat, longitude=hi_lon),
    )


def note(text: str) -> route_guide_pb2.RouteNote:
    """`LAT,LON:message` (the message may hold further colons)."""
    where, sep, message = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAT,LON:message")
    return route_guide_pb2.RouteNote(location=point(where), message=message)


def stop(text: str) -> aggregator_pb2.TourStop:
    """`LAT,LON[:note]`."""
    where, _, message = text.partition(":")
    return aggregator_pb2.TourStop(location=point(where), note=message)


def server_address(text: str) -> str:
    """`host:port`, IPv6 as `[::1]:443`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port, e.g. ping-abc-uc.a.run.app:443")
    return text


def readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return path


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 (exclusive) to 3600")
    return value
