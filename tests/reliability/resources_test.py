"""What a real routeguide process holds under floods, churn and slow readers, read from /proc: RouteChat floods
stay within the note board's caps, clients opening and dropping hundreds of connections leak no thread,
descriptor or memory, and clients that read a big ListFeatures slowly or not at all cost the server no
memory (flow control holds the stream) until their deadline ends it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from routeguide.route_guide_pb2 import Point, RouteNote
from services.routeguide.chat import DEFAULT_MAX_NOTES, DEFAULT_MAX_TOTAL_BYTES, DEFAULT_NOTES_PER_LOCATION
from tests.reliability import calls, h2c
from tests.reliability.figures import report
from tests.reliability.processes import Service, Usage, kill_all

log = logging.getLogger(__name__)
MB = 1024


async def settled(service: Service, baseline: Usage, timeout: float = 10.0) -> Usage:
    """The process's usage once its descriptors are back to `baseline` (or after `timeout`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    now = service.usage()
    while now.fds > baseline.fds and loop.time() < deadline:
        await asyncio.sleep(0.1)
        now = service.usage()
    return now


async def chat_flood(
    address: str, notes: int, *, same_place: bool, streams: int = 4, size: int = 3000
) -> int:
    """`notes` notes of `size` bytes over `streams` concurrent RouteChats; the number of notes received back."""
    received = 0

    async def one(stream: int) -> None:
        nonlocal received

        async def outgoing() -> AsyncIterator[RouteNote]:
            for number in range(stream, notes, streams):
                where = (
                    Point(latitude=1, longitude=1) if same_place else Point(latitude=number, longitude=stream)
                )
                yield RouteNote(location=where, message=f"{number:08d}".ljust(size, "."))

        async with calls.insecure(address) as channel:
            async for _ in calls.routeguide(channel).RouteChat(outgoing(), timeout=120):
                received += 1

    await asyncio.gather(*(one(stream) for stream in range(streams)))
    return received


async def test_route_chat_floods_keep_memory_within_the_note_caps() -> None:
    service = await Service("routeguide", {}).start()
    try:
        await chat_flood(service.address, 500, same_place=False)  # warm up allocator, channels and handlers
        before = service.usage()
        # Past both the count cap (10,000 notes) and the byte cap (8 MiB of notes): the board is full.
        await chat_flood(service.address, 2 * DEFAULT_MAX_NOTES, same_place=False)
        full = service.usage()
        # One location: each note gets up to 64 earlier ones back; the location keeps at most 64.
        echoed = await chat_flood(service.address, 1_000, same_place=True, streams=2, size=200)
        assert echoed == sum(min(n, DEFAULT_NOTES_PER_LOCATION) for n in range(1_000))
        # The board is at its caps already: a second flood of new notes may only replace the old ones.
        await chat_flood(service.address, 2 * DEFAULT_MAX_NOTES, same_place=False)
        after = service.usage()
    finally:
        assert await service.stop() == 0
    log.info("RouteChat flood RSS: before %s, full %s, after %s", before, full, after)
    # The caps: 8 MiB of note bytes, plus per-note overhead (Python message objects, deque and dict entries:
    # well under 1 KiB each for 10,000 notes, ~10 MiB), plus 16 MiB for allocator arenas and gRPC buffers.
    bound_kb = DEFAULT_MAX_TOTAL_BYTES // 1024 + DEFAULT_MAX_NOTES + 16 * MB
    assert full.rss_kb - before.rss_kb < bound_kb, (before, full)
    # Bounded means flat once full: another 20,000 notes add little (a fraction of one flood's bytes).
    assert after.rss_kb - full.rss_kb < 8 * MB, (full, after)


async def test_connection_churn_leaks_no_thread_descriptor_or_memory() -> None:
    service = await Service("routeguide", {}).start()
    here = Point(latitude=1, longitude=2)

    async def connect_call_drop(count: int) -> None:
        for _ in range(count):
            async with calls.insecure(service.address) as channel:
                await calls.routeguide(channel).GetFeature(here, timeout=10)

    async def abandon(count: int) -> None:
        # Raw connections that send half a message and vanish.
        for _ in range(count):
            frames = [(h2c.grpc_message(b"\x08\x01", declared=50), False)]
            await h2c.exchange(
                "127.0.0.1", service.port, "/routeguide.RouteGuide/RecordRoute", frames, close_after_send=True
            )

    try:
        await asyncio.gather(connect_call_drop(30), abandon(10))  # warm up
        baseline = await settled(service, service.usage())
        # 300 connections: 4 clients at a time opening, calling and closing; plus 60 abandoned mid-message.
        await asyncio.gather(*(connect_call_drop(75) for _ in range(4)), abandon(60))
        after = await settled(service, baseline)
        # Still serving normally.
        async with calls.insecure(service.address) as channel:
            assert (await calls.routeguide(channel).GetFeature(here, timeout=10)).location == here
    finally:
        assert await service.stop() == 0
    log.info("churn: baseline %s, after %s", baseline, after)
    assert after.fds <= baseline.fds, (baseline, after)
    assert after.threads <= baseline.threads, (baseline, after)
    assert after.rss_kb - baseline.rss_kb < 4 * MB, (baseline, after)


def big_database(path: Path, features: int) -> Path:
    """A feature file of `features` features with 200-byte names, all in one 1 x 1 degree square."""
    entries = [
        {"location": {"latitude": i, "longitude": i}, "name": f"feature {i:06d} ".ljust(200, ".")}
        for i in range(features)
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


async def test_slow_readers_of_list_features_leave_the_servers_memory_flat(tmp_path: Path) -> None:
    service = Service("routeguide", {"ROUTEGUIDE_DB": str(big_database(tmp_path / "db.json", 20_000))})
    await service.start()
    readers, stalled, deadline = 4, 4, 3.0
    stream_bytes = 0
    try:
        async with calls.insecure(service.address) as channel:
            warm = calls.routeguide(channel).ListFeatures(calls.WORLD, timeout=10)
            for _ in range(2_000):  # warm up: one stream's buffers, the handler, allocator arenas
                stream_bytes += (await warm.read()).ByteSize()
            warm.cancel()
        before = await settled(service, service.usage())
        channels = [calls.insecure(service.address) for _ in range(readers + stalled)]
        streams = [calls.routeguide(c).ListFeatures(calls.WORLD, timeout=deadline) for c in channels]
        read = [0] * len(streams)

        async def slowly(index: int) -> grpc.StatusCode:
            try:
                while await streams[index].read() is not calls.EOF_:
                    read[index] += 1
                    await asyncio.sleep(0.05)  # 20 features a second
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        async def never(index: int) -> grpc.StatusCode:
            await asyncio.sleep(deadline)  # reads nothing until its deadline has passed
            return await streams[index].code()

        peak = before.rss_kb

        async def watch() -> None:
            nonlocal peak
            for _ in range(int(deadline / 0.1) + 10):
                peak = max(peak, service.usage().rss_kb)
                await asyncio.sleep(0.1)

        ended, _ = await asyncio.gather(
            asyncio.gather(
                *(slowly(i) for i in range(readers)), *(never(i) for i in range(readers, len(streams)))
            ),
            watch(),
        )
        for channel in channels:
            await channel.close()
        after = await settled(service, before)
        # Still serving.
        async with calls.insecure(service.address) as channel:
            here = Point(latitude=7, longitude=7)
            assert (await calls.routeguide(channel).GetFeature(here, timeout=5)).name.startswith(
                "feature 000007"
            )
    finally:
        await kill_all([service])
    total_mb = 20_000 * (stream_bytes / 2_000) * len(streams) / 1024 / 1024
    report(
        "slow ListFeatures readers",
        {
            "streams": len(streams),
            "stream_total_mb": round(total_mb, 1),
            "read_by_slow_readers": read[:readers],
            "rss_kb_before_peak_after": [before.rss_kb, peak, after.rss_kb],
        },
    )
    # Every stream was ended by its deadline, none finished: the server held each at gRPC's flow-control window.
    assert ended == [grpc.StatusCode.DEADLINE_EXCEEDED] * len(streams), ended
    assert all(0 < n < 20_000 for n in read[:readers]), read
    # What the server would hold if it queued what the readers have not read: 8 x 4.0 MiB.
    assert total_mb > 30
    assert peak - before.rss_kb < 4 * MB, (before, peak)
    assert after.rss_kb - before.rss_kb < 4 * MB, (before, after)
