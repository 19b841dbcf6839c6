from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from mesh import RunningServer
from mesh.testing import running
from services.cli.testing import cli
from services.routeguide.main import build

BERKSHIRE = ("409146138", "-746188906")
BERKSHIRE_NAME = "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"


@pytest.fixture
async def routes() -> AsyncIterator[RunningServer]:
    async with running("routeguide", build) as server:
        yield server


async def test_get_names_the_feature(capsys: pytest.CaptureFixture[str], routes: RunningServer) -> None:
    done = await cli(capsys, routes.port, "routeguide", "get", *BERKSHIRE)
    assert done.status == 0
    assert done.lines == [f"{BERKSHIRE_NAME} at 409146138,-746188906"]


async def test_get_where_nothing_is(capsys: pytest.CaptureFixture[str], routes: RunningServer) -> None:
    done = await cli(capsys, routes.port, "routeguide", "get", "0", "0")
    assert (done.status, done.lines) == (0, ["no feature at 0,0"])
    done = await cli(capsys, routes.port, "--json", "routeguide", "get", "0", "0")
    assert json.loads(done.out) == {"name": "", "location": {"latitude": 0, "longitude": 0}}


async def test_get_outside_the_globe_exits_1_invalid_argument(
    capsys: pytest.CaptureFixture[str], routes: RunningServer
) -> None:
    done = await cli(capsys, routes.port, "routeguide", "get", "910000000", "0")
    assert (done.status, done.out) == (1, "")
    assert done.err.startswith("error: INVALID_ARGUMENT: ")


async def test_list_prints_a_line_per_feature(
    capsys: pytest.CaptureFixture[str], routes: RunningServer
) -> None:
    # The corners in either order: the canonical area holds all 100 features (64 named).
    area = ("420000000", "-730000000", "400000000", "-750000000")
    done = await cli(capsys, routes.port, "routeguide", "list", *area)
    assert done.status == 0
    assert len(done.lines) == 100
    assert f"{BERKSHIRE_NAME} at 409146138,-746188906" in done.lines
    assert len([line for line in done.lines if line.startswith("(no name) at ")]) == 36
    done = await cli(capsys, routes.port, "--json", "routeguide", "list", *area)
    features = [json.loads(line) for line in done.lines]
    assert len(features) == 100 and len([f for f in features if f["name"]]) == 64


async def test_record_summarises_the_route(capsys: pytest.CaptureFixture[str], routes: RunningServer) -> None:
    # Two canonical features about 14.6 km apart (haversine).
    route = ("409146138,-746188906", "410248224,-747127767")
    done = await cli(capsys, routes.port, "--json", "routeguide", "record", *route)
    assert done.status == 0
    summary = json.loads(done.out)
    assert (summary["pointCount"], summary["featureCount"]) == (2, 2)
    assert 14_000 < summary["distance"] < 15_000
    done = await cli(capsys, routes.port, "routeguide", "record", "0,0")
    assert done.lines == ["1 points, 0 features, 0 m, 0 s"]


async def test_chat_prints_earlier_notes_at_the_same_place(
    capsys: pytest.CaptureFixture[str], routes: RunningServer
) -> None:
    notes = ("1,1:first", "2,2:elsewhere", "1,1:second: with a colon", "1,1:third")
    done = await cli(capsys, routes.port, "routeguide", "chat", *notes)
    assert done.status == 0
    assert done.lines == [
        "note at 1,1: first",
        "note at 1,1: first",
        "note at 1,1: second: with a colon",
    ]


async def test_a_reader_that_goes_away_ends_the_cli_quietly(routes: RunningServer) -> None:
    # As `cli ... | head -2` once head has left: stdout is a pipe whose reader is gone before the first line.
    command = [
        sys.executable,
        "-m",
        "services.cli.main",
        "--server",
        f"127.0.0.1:{routes.port}",
        "--insecure",
    ]
    command += ["routeguide", "list", "420000000", "-730000000", "400000000", "-750000000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = await asyncio.to_thread(
            subprocess.run, command, env=env, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(writer)
    assert done.returncode == 128 + signal.SIGPIPE
    assert done.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" from the exit flush
