"""SIGTERM on real service processes (mesh.server._drain): health turns NOT_SERVING while calls are still served for the
lame duck, then new calls are refused; in-flight calls complete (or, past the grace period, are cut and
counted); no call ends CANCELLED on either serving model; buffered spans are flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import collections
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

from mesh.testing import NO_REUSEPORT, eventually
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2_grpc
from routeguide.route_guide_pb2 import Point, RouteNote

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HERE = Point(latitude=407838351, longitude=-746143763)
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
STARTED = re.compile(r"serving .* on port (\d+)")
DRAINED = re.compile(
    r"drained: (\d+) calls in flight, (\d+) finished, (\d+) cut at the end of the grace; (\d+) new"
)
MODULES = {"routeguide": "services.routeguide.main", "ping": "services.ping.main"}  # grpc.aio, threads


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

    async def start(name: str = "routeguide", **env: str) -> Service:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            MODULES[name],
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


async def refused(port: int, within: float = 15) -> grpc.StatusCode:
    """The status of a new call from a new client, once the server has stopped taking calls (bounded wait:
    calls are served through the lame duck)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT) as channel:
            try:
                await routeguide(channel).GetFeature(HERE, timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
        await asyncio.sleep(0.05)
    raise AssertionError("new calls were still accepted")


def unary(name: str, channel: grpc.aio.Channel) -> Any:
    """A unary call of the service (the one the test repeats)."""
    if name == "routeguide":
        return routeguide(channel).GetFeature(HERE, timeout=10)
    return ping_pb2_grpc.PingServiceStub(channel).Send(ping_pb2.Request(message="hi"), timeout=10)


def drained(out: str) -> tuple[int, ...]:
    """The drain's counts, from its one log line: in flight, finished, cut, refused."""
    found = [DRAINED.search(json.loads(line)["message"]) for line in out.splitlines() if line.startswith("{")]
    counts = [tuple(int(n) for n in match.groups()) for match in found if match]
    assert len(counts) == 1, out
    return counts[0]


async def test_sigterm_drains_an_in_flight_stream_and_exits_0(start: Any) -> None:
    # Spans are exported only when the batch is flushed: a schedule longer than the test proves the flush.
    service = await start(
        SHUTDOWN_GRACE_SECONDS="8",
        SHUTDOWN_LAME_DUCK_SECONDS="1",
        OTEL_TRACES_EXPORTER="console",
        OTEL_BSP_SCHEDULE_DELAY="600000",
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


async def test_a_stream_held_past_the_grace_period_is_cut_and_counted(start: Any) -> None:
    service = await start(SHUTDOWN_GRACE_SECONDS="3", SHUTDOWN_LAME_DUCK_SECONDS="0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) as channel:
        held, finishing = await open_chat(channel), await open_chat(channel)
        service.process.send_signal(signal.SIGTERM)
        # Once new calls are refused, the drain has begun with both streams in flight: one finishes in it.
        assert await refused(service.port) == grpc.StatusCode.UNAVAILABLE
        await finishing.done_writing()
        for _ in range(10):  # its replies are read to the end (both chats' notes, at the same place)
            if await asyncio.wait_for(finishing.read(), 5) is EOF:
                break
        assert await asyncio.wait_for(finishing.code(), 5) == grpc.StatusCode.OK
        # The client keeps the other open: the server must end it itself when the grace runs out.
        code = await asyncio.wait_for(held.code(), 10)
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    exit_code, out, err = await service.finish()
    assert exit_code == 0, err
    in_flight, finished, cut, new_refused = drained(out)
    assert (in_flight, finished, cut) == (2, 1, 1)
    assert new_refused >= 1  # the probe's call at least


@pytest.mark.parametrize("name", MODULES)
async def test_during_the_lame_duck_health_is_not_serving_and_new_calls_are_still_served(
    start: Any, name: str
) -> None:
    service = await start(name, SHUTDOWN_LAME_DUCK_SECONDS="6", SHUTDOWN_GRACE_SECONDS="2")
    service.process.send_signal(signal.SIGTERM)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        for _ in range(100):  # the signal is handled within a moment; bounded
            if (await health.Check(check, timeout=5)).status == NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert (await health.Check(check, timeout=5)).status == NOT_SERVING
        # A new client on a new connection, after NOT_SERVING: the port still accepts, the call is served.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) as fresh:
            await unary(name, fresh)
        assert service.process.returncode is None
    code, out, err = await service.finish()
    assert code == 0, err
    assert drained(out)[2] == 0  # nothing cut


@pytest.mark.parametrize("name", MODULES)
async def test_no_call_in_flight_at_sigterm_ends_cancelled_on_either_model(start: Any, name: str) -> None:
    # Callers that keep 96 unary calls in flight, each starting the next as soon as one ends, before, as and
    # after SIGTERM lands, until the process has gone; several SIGTERMs, as the race was per shutdown.
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(3):
        service = await start(name, SHUTDOWN_LAME_DUCK_SECONDS="0.5", SHUTDOWN_GRACE_SECONDS="5")
        gone = asyncio.Event()
        after_sigterm: collections.Counter[str] = collections.Counter()

        async def caller(channel: grpc.aio.Channel, tally: list[collections.Counter[str]]) -> None:
            for _ in range(100_000):  # bounded: ends once the process is gone
                if gone.is_set():
                    return
                try:
                    await unary(name, channel)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                    await asyncio.sleep(0.01)  # refused: the server is going; try again soon
                for counter in tally:
                    counter[code] += 1

        tally = [codes]
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=NO_REUSEPORT) for _ in range(3)
        ]
        callers = [asyncio.ensure_future(caller(c, tally)) for c in channels for _ in range(32)]
        try:
            await eventually(lambda: codes["OK"] >= 96 * 3, within=30, what="calls served before SIGTERM")
            service.process.send_signal(signal.SIGTERM)
            tally.append(after_sigterm)
            exit_code, out, err = await service.finish(timeout=20)
        finally:
            gone.set()
            await asyncio.wait_for(asyncio.gather(*callers), 30)
            for channel in channels:
                await channel.close()
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert exit_code == 0, err
        assert after_sigterm["OK"] > 0, after_sigterm  # served on through the lame duck
        assert drained(out)[2] == 0


async def test_sigint_skips_the_lame_duck(start: Any) -> None:
    # A developer's Ctrl-C: nothing health-checks a terminal's server, so waiting would only delay.
    service = await start(SHUTDOWN_LAME_DUCK_SECONDS="8", SHUTDOWN_GRACE_SECONDS="1")
    service.process.send_signal(signal.SIGINT)
    code, out, err = await service.finish(timeout=7)  # well before the lame duck would have ended
    assert code == 0, err
    assert "after a lame duck of 0.0 s" in out
