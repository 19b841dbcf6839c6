"""An instance with WORKER_PROCESSES=2: two complete servers on one port, one story on SIGTERM, and a worker
that dies ends the instance (so Cloud Run replaces it) instead of leaving it half alive."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import grpc
import pytest

from localmesh.supervisor import StartError
from mesh.testing import NO_REUSEPORT
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from tests.reliability.processes import Service

WORKERS = {"WORKER_PROCESSES": "2", "LOG_LEVEL": "INFO"}
WAIT = 20.0  # seconds for any one step before the test fails instead of hanging


def _serving_workers(service: Service) -> dict[int, int]:
    """worker number -> port, from the workers' "serving" log lines."""
    found = {}
    for line in service.lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "serving":
            found[int(entry["worker"])] = int(entry["port"])
    return found


async def _all_serving(service: Service, count: int) -> dict[int, int]:
    for _ in range(int(WAIT / 0.05)):
        found = _serving_workers(service)
        if len(found) == count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("workers did not all serve:\n" + "\n".join(service.lines[-20:]))


def _channel(port: int) -> grpc.aio.Channel:
    # A connection of its own (no subchannel sharing), so the kernel picks a worker for each.
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[*NO_REUSEPORT, ("grpc.use_local_subchannel_pool", 1)]
    )


def _worker_pids(supervisor: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == supervisor and fields[0] != "Z":
                children.append(int(entry))
    return children


async def test_two_workers_serve_one_port_and_share_its_connections() -> None:
    service = await Service("ping", WORKERS).start()
    channels = [_channel(service.port) for _ in range(24)]
    try:
        workers = await _all_serving(service, 2)
        assert set(workers) == {0, 1} and set(workers.values()) == {service.port}
        for channel in channels:
            reply = await ping_pb2_grpc.PingServiceStub(channel).Send(
                ping_pb2.Request(message="hi"), timeout=WAIT
            )
            assert reply.pong.message == "hi"
        # The kernel spreads the connections over the workers (all 24 on one of two: odds of 2 in 2^24).
        held = [len(_connections(pid, service.port)) for pid in sorted(_worker_pids(service.pid))]
        assert len(held) == 2 and sum(held) == 24 and min(held) > 0, held
    finally:
        for channel in channels:
            await channel.close()
        assert await service.stop() == 0


def _connections(pid: int, port: int) -> set[int]:
    """Socket inodes of established TCP connections to local `port` that process `pid` holds."""
    owned = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            owned.add(int(target[8:-1]))
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as file:
            for row in list(file)[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                    established.add(int(fields[9]))
    return owned & established


async def test_sigterm_drains_every_worker_and_the_instance_exits_0() -> None:
    service = await Service("routeguide", WORKERS).start()
    channels = [_channel(service.port) for _ in range(8)]
    try:
        await _all_serving(service, 2)
        streams = [route_guide_pb2_grpc.RouteGuideStub(c).RecordRoute(timeout=WAIT) for c in channels]
        point = route_guide_pb2.Point(latitude=409146138, longitude=-746188906)
        for stream in streams:
            await stream.write(point)
        service.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # every worker has heard it: NOT_SERVING, draining
        for stream in streams:  # in-flight streams on both workers keep working and complete
            await stream.write(point)
            await stream.done_writing()
        summaries = [await stream for stream in streams]
        assert [s.point_count for s in summaries] == [2] * 8
        assert await service.wait(WAIT) == 0
    finally:
        for channel in channels:
            await channel.close()
        service.kill()
    messages = service.messages()
    assert "instance stopped; worker exit codes [0, 0]" in messages


async def test_a_worker_that_dies_ends_the_instance_with_a_failure() -> None:
    service = await Service("ping", WORKERS).start()
    try:
        await _all_serving(service, 2)
        first, second = sorted(_worker_pids(service.pid))
        os.kill(first, signal.SIGKILL)
        code = await service.wait(WAIT)
    finally:
        service.kill()
    assert code == 1
    assert _worker_pids(service.pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)  # the other worker was stopped too, not orphaned
    assert any("exited with status -9; stopping the instance" in m for m in service.messages())


async def test_workers_refuse_a_port_that_another_process_holds() -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6) as taken:
        port = taken.getsockname()[1]
        service = Service("ping", WORKERS)
        with pytest.raises(StartError):
            await service.start(port=port, timeout=10)
        code = await service.wait(WAIT)
    assert code == 2
    assert any(f"PORT={port}: cannot bind" in line for line in service.lines), service.lines
