"""RouteGuide through a real grpc.aio server on loopback, with the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest

from routeguide import route_guide_pb2_grpc
from routeguide.route_guide_pb2 import Feature, Point, Rectangle, RouteNote, RouteSummary
from services.routeguide.chat import NoteBoard
from services.routeguide.features import (
    BUILTIN_RESOURCE,
    builtin_database,
    generated_database,
)
from services.routeguide.servicer import RouteGuideServicer

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from routeguide.route_guide_pb2_grpc import RouteGuideAsyncStub as Stub

OPTIONS = [("grpc.so_reuseport", 0)]
BERKSHIRE = Point(latitude=409146138, longitude=-746188906)
CANONICAL_RECT = Rectangle(
    lo=Point(latitude=400000000, longitude=-750000000), hi=Point(latitude=420000000, longitude=-730000000)
)
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
Chat = Any  # grpc.aio.StreamStreamCall; grpcio ships no type hints
WAIT = 10.0  # seconds any single read may take before the test fails instead of hanging


def _canonical_entries() -> list[dict[str, Any]]:
    """The packaged JSON file itself, decoded here without the service's loader."""
    text = resources.files("services.routeguide").joinpath(BUILTIN_RESOURCE).read_text(encoding="utf-8")
    return cast(list[dict[str, Any]], json.loads(text))


@contextlib.asynccontextmanager
async def serving(servicer: RouteGuideServicer, *channel_options: tuple[str, Any]) -> AsyncIterator[Stub]:
    server = grpc.aio.server(options=OPTIONS)
    route_guide_pb2_grpc.add_RouteGuideServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=OPTIONS + list(channel_options)
        ) as channel:
            yield cast("Stub", route_guide_pb2_grpc.RouteGuideStub(channel))
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def canonical() -> AsyncIterator[Stub]:
    async with serving(RouteGuideServicer(builtin_database())) as stub:
        yield stub


def _key(feature: Feature) -> tuple[str, int, int]:
    return feature.name, feature.location.latitude, feature.location.longitude


async def _list(stub: Stub, rect: Rectangle) -> list[tuple[str, int, int]]:
    return [_key(feature) async for feature in stub.ListFeatures(rect, timeout=WAIT)]


# GetFeature


async def test_get_feature_returns_the_named_feature(canonical: Stub) -> None:
    feature = await canonical.GetFeature(BERKSHIRE, timeout=WAIT)
    assert feature.name == "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"
    assert feature.location == BERKSHIRE


async def test_get_feature_with_nothing_there_returns_an_empty_name(canonical: Stub) -> None:
    point = Point(latitude=409146139, longitude=-746188906)
    feature = await canonical.GetFeature(point, timeout=WAIT)
    assert feature.name == "" and feature.location == point


# ListFeatures


async def test_list_features_gives_the_same_set_in_every_corner_order(canonical: Stub) -> None:
    lo, hi = CANONICAL_RECT.lo, CANONICAL_RECT.hi
    orders = [
        CANONICAL_RECT,
        Rectangle(lo=hi, hi=lo),
        Rectangle(
            lo=Point(latitude=lo.latitude, longitude=hi.longitude),
            hi=Point(latitude=hi.latitude, longitude=lo.longitude),
        ),
        Rectangle(
            lo=Point(latitude=hi.latitude, longitude=lo.longitude),
            hi=Point(latitude=lo.latitude, longitude=hi.longitude),
        ),
    ]
    results = [await _list(canonical, rect) for rect in orders]
    expected = sorted(
        (e.get("name", ""), e["location"]["latitude"], e["location"]["longitude"])
        for e in _canonical_entries()
        if 400000000 <= e["location"]["latitude"] <= 420000000
        and -750000000 <= e["location"]["longitude"] <= -730000000
    )
    for result in results:
        assert sorted(result) == expected
        assert len(result) == len(set(result))
    # Every canonical entry lies in this rectangle; 64 of them are named (36 carry an empty name).
    assert len(expected) == 100
    assert sum(1 for name, _, _ in expected if name) == 64


async def test_list_features_matches_a_scan_of_the_file(canonical: Stub) -> None:
    entries = _canonical_entries()
    rng = random.Random(1)
    found_some = 0
    for _ in range(20):
        a, b = rng.sample(entries, 2)
        lats = sorted((a["location"]["latitude"], b["location"]["latitude"]))
        lons = sorted((a["location"]["longitude"], b["location"]["longitude"]))
        expected = sorted(
            (e["name"], e["location"]["latitude"], e["location"]["longitude"])
            for e in entries
            if lats[0] <= e["location"]["latitude"] <= lats[1]
            and lons[0] <= e["location"]["longitude"] <= lons[1]
        )
        rect = Rectangle(
            lo=Point(latitude=lats[1], longitude=lons[0]), hi=Point(latitude=lats[0], longitude=lons[1])
        )
        assert sorted(await _list(canonical, rect)) == expected
        found_some += len(expected) > 2
    assert found_some > 0
    empty = Rectangle(lo=Point(latitude=0, longitude=0), hi=Point(latitude=10, longitude=10))
    assert await _list(canonical, empty) == []


async def test_list_features_stops_when_the_client_cancels() -> None:
    servicer = RouteGuideServicer(generated_database(100_000, seed=1))
    everywhere = Rectangle(
        lo=Point(latitude=-900000000, longitude=-1800000000),
        hi=Point(latitude=900000000, longitude=1800000000),
    )
    # No BDP probing: the flow-control window stays small, so the server cannot run ahead to the end.
    async with serving(servicer, ("grpc.http2.bdp_probe", 0)) as stub:
        call = stub.ListFeatures(everywhere)
        for _ in range(5):
            assert isinstance(await asyncio.wait_for(call.read(), WAIT), Feature)
        assert servicer.open_streams == 1
        assert call.cancel()
        for _ in range(200):
            if servicer.open_streams == 0:
                break
            await asyncio.sleep(0.05)
        assert servicer.open_streams == 0
        assert await call.code() == grpc.StatusCode.CANCELLED
        assert (await stub.GetFeature(Point(), timeout=WAIT)).name == ""


# RecordRoute


def _segment_m(p: Point, q: Point) -> float:
    # Independent of services.routeguide.geo: the arcsine form of the haversine formula.
    phi1, phi2 = math.radians(p.latitude / 1e7), math.radians(q.latitude / 1e7)
    dlambda = math.radians((q.longitude - p.longitude) / 1e7)
    h = math.sin((phi2 - phi1) / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * 6371000 * math.asin(math.sqrt(h))


def _expected_distance(points: list[Point]) -> int:
    return round(sum(_segment_m(p, q) for p, q in zip(points, points[1:])))


async def test_record_route_summarises_the_route(canonical: Stub) -> None:
    entries = _canonical_entries()
    at_features = [Point(**e["location"]) for e in random.Random(2).sample(entries, 10)]
    off_features = [Point(latitude=p.latitude + 1, longitude=p.longitude) for p in at_features[:4]]
    route = at_features[:5] + off_features + at_features[5:]
    started = time.monotonic()
    summary = await canonical.RecordRoute(iter(route), timeout=WAIT)
    took = time.monotonic() - started
    assert summary.point_count == 14
    assert summary.feature_count == 10
    assert summary.distance == _expected_distance(route)
    assert summary.distance > 100_000  # a real trip, so the comparison above is not 0 == 0
    assert 0 <= summary.elapsed_time <= took + 1


async def test_record_route_elapsed_time_runs_from_first_to_last_point() -> None:
    ticks = itertools.count(100.0, 1.5)  # a clock that moves 1.5 s for each point the server reads
    servicer = RouteGuideServicer(builtin_database(), clock=lambda: next(ticks))
    route = [BERKSHIRE, Point(latitude=1, longitude=1), Point(latitude=2, longitude=2), BERKSHIRE]
    async with serving(servicer) as stub:
        summary = await stub.RecordRoute(iter(route), timeout=WAIT)
    assert summary.elapsed_time == 4  # int(3 x 1.5), from the first point to the last
    assert summary.feature_count == 2


async def test_record_route_with_no_points(canonical: Stub) -> None:
    assert await canonical.RecordRoute(iter([]), timeout=WAIT) == RouteSummary()


async def test_record_route_with_a_long_route_keeps_running_totals(canonical: Stub) -> None:
    def zigzag() -> Iterator[Point]:
        for number in range(20_000):
            yield (
                BERKSHIRE
                if number % 2 == 0
                else Point(latitude=BERKSHIRE.latitude + 1000, longitude=BERKSHIRE.longitude)
            )

    summary = await canonical.RecordRoute(zigzag(), timeout=60)
    assert summary.point_count == 20_000
    assert summary.feature_count == 10_000
    step = _segment_m(BERKSHIRE, Point(latitude=BERKSHIRE.latitude + 1000, longitude=BERKSHIRE.longitude))
    assert summary.distance == round(19_999 * step)  # about 222 km in 11 m steps


# RouteChat


def _note(latitude: int, longitude: int, message: str) -> RouteNote:
    return RouteNote(location=Point(latitude=latitude, longitude=longitude), message=message)


async def _read(call: Chat, count: int) -> list[str]:
    messages = []
    for _ in range(count):
        note = await asyncio.wait_for(call.read(), WAIT)
        assert isinstance(note, RouteNote), note
        messages.append(note.message)
    return messages


async def test_route_chat_shares_earlier_notes_across_concurrent_streams(canonical: Stub) -> None:
    here, elsewhere = (1, 1), (2, 2)
    alice = canonical.RouteChat(None, timeout=WAIT)
    bob = canonical.RouteChat(None, timeout=WAIT)
    await alice.write(_note(*here, "a1"))
    await alice.write(_note(*elsewhere, "a-elsewhere"))
    await alice.write(_note(*here, "a2"))
    # a2 comes back with a1 only: the note elsewhere is not at this location.
    assert await _read(alice, 1) == ["a1"]
    await bob.write(_note(*here, "b1"))
    assert await _read(bob, 2) == ["a1", "a2"]
    await alice.write(_note(*here, "a3"))
    assert await _read(alice, 3) == ["a1", "a2", "b1"]
    await bob.write(_note(*elsewhere, "b2"))
    assert await _read(bob, 1) == ["a-elsewhere"]
    await alice.done_writing()
    await bob.done_writing()
    assert await asyncio.wait_for(alice.read(), WAIT) is EOF
    assert await asyncio.wait_for(bob.read(), WAIT) is EOF
    assert await alice.code() == grpc.StatusCode.OK and await bob.code() == grpc.StatusCode.OK


async def test_route_chat_many_concurrent_streams_lose_no_note() -> None:
    servicer = RouteGuideServicer(builtin_database())
    async with serving(servicer) as stub:

        async def chatter(name: str) -> list[str]:
            call = stub.RouteChat(None, timeout=WAIT)
            heard: list[str] = []
            for number in range(5):
                await call.write(_note(7, 7, f"{name}-{number}"))
            await call.done_writing()
            while (note := await asyncio.wait_for(call.read(), WAIT)) is not EOF:
                assert isinstance(note, RouteNote), note
                heard.append(note.message)
            assert await call.code() == grpc.StatusCode.OK
            return heard

        await asyncio.gather(*(chatter(f"c{n}") for n in range(8)))
        last = stub.RouteChat(None, timeout=WAIT)
        await last.write(_note(7, 7, "last"))
        heard = await _read(last, 40)
        last.cancel()
    assert sorted(heard) == sorted(f"c{n}-{m}" for n in range(8) for m in range(5))


async def test_route_chat_note_caps_hold() -> None:
    board: NoteBoard[RouteNote] = NoteBoard(notes_per_location=3, max_notes=5)
    async with serving(RouteGuideServicer(builtin_database(), notes=board)) as stub:
        call = stub.RouteChat(None, timeout=WAIT)
        for number in range(6):
            await call.write(_note(1, 1, f"n{number}"))
        # Replies: 0, 1, 2, 3, 3, 3 earlier notes; the fifth note sees only n1..n3.
        replies = await _read(call, 0 + 1 + 2 + 3 + 3 + 3)
        assert replies[-6:] == ["n1", "n2", "n3", "n2", "n3", "n4"]
        for number in range(5):
            await call.write(_note(10 + number, 0, f"elsewhere{number}"))
        # The total cap (5) has pushed every note at (1, 1) out, so the probe there hears nothing and
        # the next reply is the one for the probe elsewhere.
        await call.write(_note(1, 1, "probe"))
        await call.write(_note(14, 0, "probe-elsewhere"))
        assert await _read(call, 1) == ["elsewhere4"]
        call.cancel()
    assert len(board) == 5
    assert board.notes_at((1, 1))[0].message == "probe"


async def test_route_chat_rejects_an_oversized_note() -> None:
    board: NoteBoard[RouteNote] = NoteBoard(max_note_bytes=64)
    async with serving(RouteGuideServicer(builtin_database(), notes=board)) as stub:
        call = stub.RouteChat(None, timeout=WAIT)
        await call.write(_note(1, 1, "fine"))
        await call.write(_note(1, 1, "x" * 100))
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = await call.details()
        assert details is not None and details.startswith("notes[1]: note is ") and "at most 64" in details
    assert len(board) == 1


# Invalid coordinates


@pytest.mark.parametrize(
    "point, expected",
    [
        (Point(latitude=900000001, longitude=0), "latitude 900000001 is out of range"),
        (Point(latitude=0, longitude=-1800000001), "longitude -1800000001 is out of range"),
    ],
)
async def test_get_feature_rejects_invalid_coordinates(canonical: Stub, point: Point, expected: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await canonical.GetFeature(point, timeout=WAIT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(expected)


@pytest.mark.parametrize(
    "rect, expected",
    [
        (Rectangle(lo=Point(latitude=-900000001), hi=Point()), "lo.latitude -900000001 is out of range"),
        (Rectangle(lo=Point(), hi=Point(longitude=1800000001)), "hi.longitude 1800000001 is out of range"),
    ],
)
async def test_list_features_rejects_invalid_coordinates(
    canonical: Stub, rect: Rectangle, expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _list(canonical, rect)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(expected)


async def test_record_route_rejects_invalid_coordinates(canonical: Stub) -> None:
    route = [BERKSHIRE, BERKSHIRE, Point(latitude=0, longitude=2147483647)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await canonical.RecordRoute(iter(route), timeout=WAIT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("points[2].longitude 2147483647 is out of range")


async def test_route_chat_rejects_invalid_coordinates(canonical: Stub) -> None:
    call = canonical.RouteChat(None, timeout=WAIT)
    await call.write(_note(5, 5, "ok"))
    await call.write(_note(-2147483648, 5, "bad"))
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await call.details() or "").startswith("notes[1].location.latitude -2147483648 is out of range")
    # The server keeps serving after rejecting.
    assert (await canonical.GetFeature(BERKSHIRE, timeout=WAIT)).name.startswith("Berkshire")
