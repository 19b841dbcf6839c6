"""SIGTERM on a real routeguide process with a RouteChat stream in flight: health turns NOT_SERVING, new calls
are refused, the in-flight stream keeps working and completes (or, past the grace period, ends with a clean
status), buffered spans are flushed, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.testing import NO_REUSEPORT
from routeguide import route_guide_pb2_grpc
from routeguide.route_guide_pb2 import Point, RouteNote

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HERE = Point(latitude=407838351, longitude=-746143763)
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
STARTED = re.compile(r"serving .* on port (\d+)")


@dataclass
class Service:
    process: asyncio.subprocess.Process
    port: int
    stdout: list[str] = field(default_factory=list)

    async def finish(self, timeout: float = 15) -> tuple[int, str, str]:
        """Waits for the exit; returns the exit code, all of stdout and stderr."""
        assert self.process.stdout and self.process.stderr
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, "".join(self.stdout) + out.decode(), err.decode()


def routeguide(channel: grpc.aio.Channel) -> route_guide_pb2_grpc.RouteGuideAsyncStub:
    return route_guide_pb2_grpc.RouteGuideStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    started: list[asyncio.subprocess.Process] = []

    async def start(**env: str) -> Service:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.routeguide.main",
            env={
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": os.pathsep.join(sys.path),
                "PORT": "0",
                **env,
            },
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        assert process.stdout
        lines: list[str] = []
        # stdout is not a terminal: JSON log lines, the first of them naming the port.
        for _ in range(50):
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, f"exited before serving: {''.join(lines)}"
            lines.append(line)
            found = STARTED.search(json.loads(line)["message"])
            if found:
                return Service(process, int(found.group(1)), lines)
        raise AssertionError(f"no 'serving ... on port N' line in {''.join(lines)}")

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


def note(message: str) -> RouteNote:
    return RouteNote(location=HERE, message=message)


async def open_chat(channel: grpc.aio.Channel) -> Any:
    """A RouteChat that is shown to be live: the second note at HERE gets the first one back."""
    # No request iterator: the test writes and reads on the call, and keeps it open as long as it likes.
    chat: Any = routeguide(channel).RouteChat(timeout=20)  # type: ignore[call-arg]
    await chat.write(note("first"))
    await chat.write(note("second"))
    assert (await asyncio.wait_for(chat.read(), 5)).message == "first"
    return chat


async def refused(port: int) -> grpc.StatusCode:
    """The status of a new call from a new client, once the server has stopped taking calls (bounded wait)."""
    for _ in range(50):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT) as channel:
            try:
                await routeguide(channel).GetFeature(HERE, timeout=2)
            except grpc.aio.AioRpcError as err:
                return err.code()
        await asyncio.sleep(0.05)  # NOT_SERVING comes just before the server stops accepting
    raise AssertionError("new calls were still accepted")


async def test_sigterm_drains_an_in_flight_stream_and_exits_0(start: Any) -> None:
    # Spans are exported only when the batch is flushed: a schedule longer than the test proves the flush.
    service = await start(
        SHUTDOWN_GRACE_SECONDS="8", OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="600000"
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) as channel:
        chat = await open_chat(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

        service.process.send_signal(signal.SIGTERM)

        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()  # a health watch never ends by itself; the drain would wait for it
        assert await refused(service.port) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as on_the_open_connection:
            await routeguide(channel).GetFeature(HERE, timeout=2)
        assert on_the_open_connection.value.code() == grpc.StatusCode.UNAVAILABLE

        # The stream in flight still works during the drain, then completes normally.
        await chat.write(note("third"))
        assert [(await asyncio.wait_for(chat.read(), 5)).message for _ in range(2)] == ["first", "second"]
        await chat.done_writing()
        assert await asyncio.wait_for(chat.read(), 5) is EOF
        assert await chat.code() == grpc.StatusCode.OK

    code, out, err = await service.finish()
    assert code == 0, err
    messages = [json.loads(line)["message"] for line in out.splitlines() if line.startswith('{"severity"')]
    assert any("shutting down" in m for m in messages) and messages[-1] == "routeguide stopped"
    assert '"name": "/routeguide.RouteGuide/RouteChat"' in out  # the span, flushed at shutdown


async def test_a_stream_held_past_the_grace_period_ends_with_a_clean_status(start: Any) -> None:
    service = await start(SHUTDOWN_GRACE_SECONDS="0.5")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) as channel:
        chat = await open_chat(channel)
        service.process.send_signal(signal.SIGTERM)
        # The client keeps its side open: the server must end the stream itself when the grace runs out.
        code = await asyncio.wait_for(chat.code(), 10)
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    exit_code, _, err = await service.finish()
    assert exit_code == 0, err
