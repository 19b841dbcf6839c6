from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import pytest

from mesh import RunningServer
from mesh.testing import running
from services.aggregator.main import build as build_aggregator
from services.cli.testing import cli
from services.ping.main import build as build_ping
from services.routeguide.main import build as build_routeguide

AREA = "400000000,-750000000,420000000,-730000000"  # holds all 100 canonical features, 64 named
ROUTE = ("409146138,-746188906", "410248224,-747127767")
BERKSHIRE_NAME = "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"
SURVEY = ("aggregator", "survey", "--message", "hello", "--area", AREA, "--route", *ROUTE)


def aggregator_env(ping_port: int, routes_port: int) -> dict[str, str]:
    return {
        "PING_ADDR": f"127.0.0.1:{ping_port}",
        "ROUTEGUIDE_ADDR": f"127.0.0.1:{routes_port}",
        "UPSTREAM_INSECURE": "1",
    }


@pytest.fixture
async def aggregator() -> AsyncIterator[RunningServer]:
    async with (
        running("ping", build_ping) as ping,
        running("routeguide", build_routeguide) as routes,
        running("aggregator", build_aggregator, aggregator_env(ping.port, routes.port)) as server,
    ):
        yield server


async def test_survey_prints_the_parts_and_a_table_of_calls(
    capsys: pytest.CaptureFixture[str], aggregator: RunningServer
) -> None:
    done = await cli(capsys, aggregator.port, *SURVEY)
    assert done.status == 0
    assert done.lines[0].startswith("pong 1: 'hello' received ")
    assert done.lines[1] == "features: 100 in the area, 64 named"
    assert re.fullmatch(r"route: 2 points, 2 features, 14\d{3} m, \d+ s", done.lines[2])
    assert done.lines[3] == ""
    header, *rows = done.lines[4:]
    assert header.split() == ["CALL", "CODE", "LATENCY", "MESSAGE"]
    assert [row.split()[:2] for row in rows] == [
        ["/ping.PingService/Send", "OK"],
        ["/routeguide.RouteGuide/ListFeatures", "OK"],
        ["/routeguide.RouteGuide/RecordRoute", "OK"],
    ]
    assert all(row.split()[3] == "ms" for row in rows)


async def test_survey_as_json_is_one_response(
    capsys: pytest.CaptureFixture[str], aggregator: RunningServer
) -> None:
    done = await cli(capsys, aggregator.port, "--json", *SURVEY)
    assert done.status == 0 and len(done.lines) == 1
    response = json.loads(done.out)
    assert response["pong"]["message"] == "hello"
    assert len(response["features"]) == 100
    assert response["routeSummary"]["pointCount"] == 2
    assert [call["code"] for call in response["calls"]] == [0, 0, 0]
    assert all(call["latency"].endswith("s") for call in response["calls"])


async def test_survey_with_routeguide_stopped_shows_the_failed_calls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with running("routeguide", build_routeguide) as gone:
        stopped = gone.port
    async with (
        running("ping", build_ping) as ping,
        running("aggregator", build_aggregator, aggregator_env(ping.port, stopped)) as server,
    ):
        done = await cli(capsys, server.port, *SURVEY)
    assert done.status == 0  # a partial result is a result
    assert done.lines[1:3] == ["features: 0 in the area, 0 named", "route: none"]
    codes = [line.split()[1] for line in done.lines[5:]]
    assert codes == ["OK", "UNAVAILABLE", "UNAVAILABLE"]


async def test_survey_with_every_downstream_stopped_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping", build_ping) as ping, running("routeguide", build_routeguide) as routes:
        ports = (ping.port, routes.port)
    async with running("aggregator", build_aggregator, aggregator_env(*ports)) as server:
        done = await cli(capsys, server.port, *SURVEY)
    assert (done.status, done.out) == (1, "")
    assert done.err.startswith("error: UNAVAILABLE: ") and "every downstream call failed" in done.err


async def test_tour_prints_each_arrival_and_earlier_notes(
    capsys: pytest.CaptureFixture[str], aggregator: RunningServer
) -> None:
    stops = ("409146138,-746188906:first visit", "0,0", "409146138,-746188906:second visit")
    done = await cli(capsys, aggregator.port, "aggregator", "tour", *stops)
    assert done.status == 0
    # Updates are printed as they arrive: each stop's arrival, and the earlier note once the third stop posts.
    assert sorted(done.lines) == sorted(
        [
            f"stop 0: {BERKSHIRE_NAME} at 409146138,-746188906",
            "stop 1: no feature at 0,0",
            f"stop 2: {BERKSHIRE_NAME} at 409146138,-746188906",
            "note at 409146138,-746188906: first visit",
        ]
    )
    done = await cli(capsys, aggregator.port, "--json", "aggregator", "tour", "0,0:x")
    assert [json.loads(line) for line in done.lines] == [
        {"arrival": {"stop": 0, "feature": {"name": "", "location": {"latitude": 0, "longitude": 0}}}}
    ]
