"""What a real routeguide process holds under floods and churn, read from /proc: RouteChat floods stay within
the note board's caps, and clients opening and dropping hundreds of connections leak no thread, descriptor or
memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from routeguide.route_guide_pb2 import Point, RouteNote
from services.routeguide.chat import (
    DEFAULT_MAX_NOTES,
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_STREAM_REPLY_BYTES,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_NOTES_PER_LOCATION,
)
from tests.reliability import calls, h2c
from tests.reliability.figures import record
from tests.reliability.processes import Service, Usage

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


async def test_route_chat_answers_are_bounded_per_note_and_per_stream() -> None:
    # 4 places, each with 64 notes of ~3.9 KB; then one stream of 20-byte notes visiting the places in turn.
    # Before the bounds, each small note brought back 64 x 3.9 KB = 250 KB, on every note of the stream.
    places = [Point(latitude=7, longitude=place) for place in range(1, 5)]
    service = await Service("routeguide", {}).start()
    try:
        async with calls.insecure(service.address) as channel:
            chat = calls.routeguide(channel)
            for where in places:  # one stream per place: filling one answers 3.5 MB, under the stream bound

                async def filling(where: Point = where) -> AsyncIterator[RouteNote]:
                    for number in range(DEFAULT_NOTES_PER_LOCATION):
                        yield RouteNote(location=where, message=f"{number:02d}".ljust(3900, "."))

                async for _ in chat.RouteChat(filling(), timeout=60):
                    pass

            async def small() -> AsyncIterator[RouteNote]:
                for number in range(1_000):
                    yield RouteNote(location=places[number % len(places)], message=f"small {number:05d}")

            answers: list[RouteNote] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for answer in chat.RouteChat(small(), timeout=60):
                    answers.append(answer)
    finally:
        assert await service.stop() == 0
    sizes = [answer.ByteSize() for answer in answers]
    record("RouteChat, one stream of 20-byte notes", {"notes_back": len(answers), "bytes_back": sum(sizes)})
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {DEFAULT_MAX_STREAM_REPLY_BYTES} bytes of earlier notes on one stream" in (
        ended.value.details() or ""
    )
    assert sum(sizes) <= DEFAULT_MAX_STREAM_REPLY_BYTES
    # The first small note's answer: the newest 16 notes there (what fits in 64 KiB), oldest first.
    per_note = DEFAULT_MAX_REPLY_BYTES // sizes[0]
    assert [note.message[:2] for note in answers[:per_note]] == [f"{n:02d}" for n in range(64 - per_note, 64)]
    assert per_note == 16 and sum(sizes[:per_note]) <= DEFAULT_MAX_REPLY_BYTES
