"""What the CLI prints: one human-readable line per result by default, or with --json each protobuf message
as one line of JSON (the proto3 JSON mapping, every field shown) so scripts can read a stream line by line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from aggregator.v1 import aggregator_pb2
from ping import ping_pb2
from routeguide import route_guide_pb2

M = TypeVar("M", bound=Message)

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class Printer:
    """Writes results to stdout as they arrive (streams are printed while they run)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, message: M, human: Callable[[M], str]) -> None:
        if self.as_json:
            line = json_format.MessageToJson(message, indent=None, always_print_fields_with_no_presence=True)
        else:
            line = human(message)
        print(line, file=sys.stdout, flush=True)


def error_line(code: grpc.StatusCode, details: str | None) -> str:
    return f"error: {code.name}: {details or '(no message)'}"


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, f"CODE_{code}")


def where(location: route_guide_pb2.Point) -> str:
    """A point as the CLI takes it: `LAT,LON` in degrees x 1e7, so it can be pasted back."""
    return f"{location.latitude},{location.longitude}"


def pong(response: ping_pb2.Response) -> str:
    received = (
        response.pong.received_on.ToJsonString() if response.pong.HasField("received_on") else "unknown"
    )
    return f"pong {response.pong.index}: {response.pong.message!r} received {received}"


def feature(found: route_guide_pb2.Feature) -> str:
    return f"{found.name or '(no name)'} at {where(found.location)}"


def lookup(found: route_guide_pb2.Feature) -> str:
    """GetFeature's answer: an empty name means nothing is there (the canonical semantics)."""
    return (
        f"{found.name} at {where(found.location)}" if found.name else f"no feature at {where(found.location)}"
    )


def summary(route: route_guide_pb2.RouteSummary) -> str:
    return (
        f"{route.point_count} points, {route.feature_count} features, "
        f"{route.distance} m, {route.elapsed_time} s"
    )


def note(received: route_guide_pb2.RouteNote) -> str:
    return f"note at {where(received.location)}: {received.message}"


def tour_update(update: aggregator_pb2.TourUpdate) -> str:
    if update.HasField("arrival"):
        arrival = update.arrival
        if arrival.HasField("failure"):
            failed = arrival.failure
            return f"stop {arrival.stop}: lookup failed: {code_name(failed.code)} {failed.message}".rstrip()
        return f"stop {arrival.stop}: {lookup(arrival.feature)}"
    return note(update.note)


def survey(response: aggregator_pb2.SurveyResponse) -> str:
    """The parts of the survey, then a table of the downstream calls behind it."""
    named = sum(1 for f in response.features if f.name)
    lines = [
        pong(ping_pb2.Response(pong=response.pong)) if response.HasField("pong") else "pong: none",
        f"features: {len(response.features)} in the area, {named} named",
        f"route: {summary(response.route_summary)}" if response.HasField("route_summary") else "route: none",
        "",
    ]
    rows = [("CALL", "CODE", "LATENCY", "MESSAGE")]
    for call in response.calls:
        latency = f"{call.latency.ToNanoseconds() / 1e6:.1f} ms"
        rows.append((call.method, code_name(call.code), latency, call.message))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for method, code, latency, message in rows:
        lines.append(
            f"{method:<{widths[0]}}  {code:<{widths[1]}}  {latency:>{widths[2]}}  {message}".rstrip()
        )
    return "\n".join(lines)
