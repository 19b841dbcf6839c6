from __future__ import annotations

import json

import pytest

from mesh.testing import running
from services.cli.testing import cli
from services.ping.main import build


async def test_send_prints_the_pong(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping", build) as server:
        done = await cli(capsys, server.port, "ping", "send", "--message", "hello there")
    assert (done.status, done.err) == (0, "")
    assert len(done.lines) == 1 and done.lines[0].startswith("pong 1: 'hello there' received 20")


async def test_send_as_json_is_the_response_message(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping", build) as server:
        done = await cli(capsys, server.port, "--json", "ping", "send", "--message", "hi")
    assert done.status == 0
    response = json.loads(done.out)
    assert response["pong"]["index"] == 1 and response["pong"]["message"] == "hi"
    assert response["pong"]["receivedOn"].endswith("Z")


async def test_relay_goes_through_the_servers_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping-upstream", build) as upstream:
        env = {"GRPC_PING_HOST": f"127.0.0.1:{upstream.port}", "GRPC_PING_INSECURE": "1"}
        async with running("ping", build, env) as relay:
            done = await cli(capsys, relay.port, "--json", "ping", "send", "--message", "hi", "--relay")
    assert done.status == 0
    assert json.loads(done.out)["pong"]["message"] == "hi (relayed)"


async def test_relay_without_upstream_exits_1_with_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping", build) as server:
        done = await cli(capsys, server.port, "ping", "send", "--message", "hi", "--relay")
    assert (done.status, done.out) == (1, "")
    assert done.err.startswith("error: FAILED_PRECONDITION: ")
    assert "GRPC_PING_HOST" in done.err


async def test_a_stopped_server_exits_1_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    async with running("ping", build) as gone:
        port = gone.port
    done = await cli(capsys, port, "--timeout", "5", "ping", "send", "--message", "hi")
    assert done.status == 1
    assert done.err.startswith("error: UNAVAILABLE: ")
