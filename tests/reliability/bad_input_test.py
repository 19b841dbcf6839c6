"""Bad input to every method of the three services, as real h2c processes: out-of-range coordinates, rectangles
in every corner order, empty routes and routes past the Survey's cap, messages over the 4 MiB limit and over
each service's own, bytes that are no protobuf, and frames no gRPC client would send (lying length prefixes,
truncated messages). Each gets a precise status, and a healthy client calling throughout never sees an
error."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError, Message

from aggregator.v1 import aggregator_pb2
from ping import ping_pb2
from routeguide import route_guide_pb2
from routeguide.route_guide_pb2 import Point, Rectangle, RouteNote
from services.aggregator.survey import MAX_REQUEST_BYTES, MAX_ROUTE_POINTS
from services.aggregator.testing import largest_survey
from services.ping.main import MAX_REQUEST as PING_MAX_REQUEST
from services.routeguide.main import MAX_REQUEST as ROUTEGUIDE_MAX_REQUEST
from tests.reliability import calls, h2c
from tests.reliability.calls import METHODS, UNLIMITED, SteadyClient
from tests.reliability.figures import report
from tests.reliability.stack import Stack, start_h2c

pytestmark = pytest.mark.asyncio(loop_scope="module")

Code = grpc.StatusCode
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LIMIT = 4 * 1024 * 1024
FOUND = Point(latitude=409146138, longitude=-746188906)
INVALID = Code.INVALID_ARGUMENT.value[0]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack() -> AsyncIterator[Stack]:
    started = await start_h2c()
    yield started
    assert await started.stop() == {"aggregator": 0, "ping": 0, "routeguide": 0}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def channels(stack: Stack) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened = {s.name: calls.insecure(s.address, UNLIMITED) for s in stack.all}
    yield opened
    for channel in opened.values():
        await channel.close()


@pytest_asyncio.fixture(loop_scope="module")
async def steady(stack: Stack) -> AsyncIterator[SteadyClient]:
    """A healthy client of ping and routeguide during the test; the test fails if any of its calls failed."""
    client, opened = await calls.steady_calls(stack.ping.address, stack.routeguide.address)
    await asyncio.sleep(0.05)
    yield client
    state = await client.stop()
    for channel in opened:
        await channel.close()
    assert state.errors == [] and state.calls > 0, state
    assert all(s.returncode is None for s in stack.all)


def first_features(stack: Stack, reply: aggregator_pb2.SurveyResponse) -> list[tuple[int, int]]:
    return sorted((f.location.latitude, f.location.longitude) for f in reply.features)


# Out-of-range coordinates -------------------------------------------------------------------------------------
BAD_POINTS = [
    (Point(latitude=INT32_MAX, longitude=0), "latitude 2147483647 is out of range"),
    (Point(latitude=0, longitude=INT32_MIN), "longitude -2147483648 is out of range"),
    (Point(latitude=-900_000_001, longitude=1_800_000_001), "latitude -900000001 is out of range"),
]


@pytest.mark.parametrize("bad, message", BAD_POINTS)
async def test_out_of_range_coordinates_are_invalid_argument_on_every_routeguide_method(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient, bad: Point, message: str
) -> None:
    stub = calls.routeguide(channels["routeguide"])

    async def route() -> AsyncIterator[Point]:
        yield FOUND
        yield bad

    async def chat() -> AsyncIterator[RouteNote]:
        yield RouteNote(location=bad, message="x")

    attempts: dict[str, Awaitable[object]] = {
        "GetFeature": stub.GetFeature(bad, timeout=10),
        "ListFeatures": _drain(stub.ListFeatures(Rectangle(lo=FOUND, hi=bad), timeout=10)),
        "RecordRoute": stub.RecordRoute(route(), timeout=10),
        "RouteChat": _drain(stub.RouteChat(chat(), timeout=10)),
    }
    expected = {
        "GetFeature": message,
        "ListFeatures": f"hi.{message}",
        "RecordRoute": f"points[1].{message}",
        "RouteChat": f"notes[0].location.{message}",
    }
    for name, attempt in attempts.items():
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await attempt
        assert error.value.code() == Code.INVALID_ARGUMENT, name
        assert (error.value.details() or "").startswith(expected[name]), (name, error.value.details())


async def _drain(call: object) -> list[object]:
    return [item async for item in call]  # type: ignore[attr-defined]


async def test_survey_reports_an_out_of_range_area_and_route_point(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    request = aggregator_pb2.SurveyRequest(
        message="bad", area=Rectangle(lo=Point(latitude=INT32_MAX), hi=FOUND), route=[FOUND, BAD_POINTS[1][0]]
    )
    reply = await calls.aggregator(channels["aggregator"]).Survey(request, timeout=10)
    assert [c.code for c in reply.calls] == [0, INVALID, INVALID]
    assert reply.calls[1].message.startswith("lo.latitude 2147483647 is out of range")
    assert reply.calls[2].message.startswith("points[1].longitude -2147483648 is out of range")
    assert reply.pong.message == "bad" and not reply.features and not reply.HasField("route_summary")


async def test_a_tour_stop_out_of_range_ends_the_tour_with_invalid_argument(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=FOUND, note="fine")
        yield aggregator_pb2.TourStop(location=BAD_POINTS[0][0], note="not on this planet")

    call = calls.aggregator(channels["aggregator"]).Tour(stops(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _drain(call)
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert (
        error.value.details()
        == f"routeguide: {BAD_POINTS[0][1]}: must be within +-900000000 (+-90 degrees x 1e7)"
    )


# Rectangles and routes ----------------------------------------------------------------------------------------
async def test_rectangles_in_every_corner_order_give_the_same_features(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    south, north, west, east = 400_000_000, 420_000_000, -750_000_000, -730_000_000
    corners = [
        (south, west, north, east),
        (north, east, south, west),
        (south, east, north, west),
        (north, west, south, east),
    ]
    listed, surveyed = set(), set()
    for lat_a, lon_a, lat_b, lon_b in corners:
        area = Rectangle(lo=Point(latitude=lat_a, longitude=lon_a), hi=Point(latitude=lat_b, longitude=lon_b))
        features = await _drain(calls.routeguide(channels["routeguide"]).ListFeatures(area, timeout=10))
        listed.add(tuple(sorted(f.name for f in features)))  # type: ignore[attr-defined]
        reply = await calls.aggregator(channels["aggregator"]).Survey(
            aggregator_pb2.SurveyRequest(message="corners", area=area), timeout=10
        )
        surveyed.add(tuple(sorted(f.name for f in reply.features)))
    assert len(listed) == 1 and listed == surveyed
    assert len(next(iter(listed))) > 10  # the built-in dataset has features around the Jersey Highlands


async def test_a_degenerate_rectangle_on_a_feature_finds_exactly_it(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    stub = calls.routeguide(channels["routeguide"])
    some = (await _drain(stub.ListFeatures(calls.WORLD, timeout=10)))[7]
    here = some.location  # type: ignore[attr-defined]
    assert await _drain(stub.ListFeatures(Rectangle(lo=here, hi=here), timeout=10)) == [some]


async def test_empty_routes_are_summarised_as_nothing(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    async def nothing() -> AsyncIterator[Point]:
        return
        yield

    summary = await calls.routeguide(channels["routeguide"]).RecordRoute(nothing(), timeout=10)
    assert summary == route_guide_pb2.RouteSummary()
    reply = await calls.aggregator(channels["aggregator"]).Survey(
        aggregator_pb2.SurveyRequest(message="", area=Rectangle()), timeout=10
    )
    assert [c.code for c in reply.calls] == [0, 0, 0]
    assert reply.route_summary == route_guide_pb2.RouteSummary() and reply.HasField("route_summary")


async def test_a_route_past_the_cap_is_invalid_argument_stating_the_cap(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    route = [Point(latitude=i * 1_000, longitude=-i * 1_000) for i in range(MAX_ROUTE_POINTS + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await calls.aggregator(channels["aggregator"]).Survey(
            aggregator_pb2.SurveyRequest(message="long", area=Rectangle(), route=route), timeout=30
        )
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert f"a Survey takes at most {MAX_ROUTE_POINTS}" in (error.value.details() or "")


def _cpu_seconds(stack: Stack) -> float:
    return stack.aggregator.cpu_seconds() + stack.routeguide.cpu_seconds()


async def test_the_largest_survey_costs_under_a_cpu_second_in_aggregator_and_routeguide(
    stack: Stack, channels: dict[str, grpc.aio.Channel]
) -> None:
    # No steady client here: its calls would count in routeguide's CPU.
    request = largest_survey()
    before = _cpu_seconds(stack)
    reply = await calls.aggregator(channels["aggregator"]).Survey(request, timeout=60)
    spent = _cpu_seconds(stack) - before
    assert [c.code for c in reply.calls] == [0, 0, 0]
    assert reply.route_summary.point_count == MAX_ROUTE_POINTS
    # Before the cap, a 4 MiB Survey of empty Points (about 2 million) cost about 20 s in each of them.
    empty = aggregator_pb2.SurveyRequest(route=[Point()] * (MAX_REQUEST_BYTES // 2 - 8))
    assert empty.ByteSize() <= MAX_REQUEST_BYTES
    before_empty = _cpu_seconds(stack)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await calls.aggregator(channels["aggregator"]).Survey(empty, timeout=60)
    spent_empty = _cpu_seconds(stack) - before_empty
    assert error.value.code() == Code.INVALID_ARGUMENT
    figures = {"cpu_s_at_cap": round(spent, 3), "cpu_s_empty_points": round(spent_empty, 3)}
    report("survey at its limits", {**figures, "bytes": request.ByteSize()})
    assert spent < 1.0 and spent_empty < 1.0, (spent, spent_empty)


# Size limits --------------------------------------------------------------------------------------------------
def _oversized(limit: int = LIMIT) -> bytes:
    """A message of each type (all fields optional) with an unknown field that takes it past `limit`."""
    body = b"x" * (limit + 16)
    return b"\x7a" + _varint(len(body)) + body  # field 15, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


@pytest.mark.parametrize("method", list(METHODS))
async def test_a_message_over_the_size_limit_is_resource_exhausted(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient, method: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await calls.raw_call(channels[calls.service_of(method)], method, [_oversized()], timeout=20)
    assert error.value.code() == Code.RESOURCE_EXHAUSTED
    assert (error.value.details() or "").startswith("SERVER: Received message larger than max")


# What each service's contract needs: ping and routeguide take small messages, the aggregator a Survey's route.
SERVICE_LIMITS = {
    "ping": PING_MAX_REQUEST,
    "routeguide": ROUTEGUIDE_MAX_REQUEST,
    "aggregator": MAX_REQUEST_BYTES,
}


@pytest.mark.parametrize("method", [m for m in METHODS if SERVICE_LIMITS[calls.service_of(m)] < LIMIT])
async def test_a_message_over_its_service_limit_is_resource_exhausted(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient, method: str
) -> None:
    limit = SERVICE_LIMITS[calls.service_of(method)]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await calls.raw_call(channels[calls.service_of(method)], method, [_oversized(limit)], timeout=20)
    assert error.value.code() == Code.RESOURCE_EXHAUSTED
    assert (error.value.details() or "").startswith("SERVER: Received message larger than max")
    # Within the limit, the same kind of message is not refused for its size (some methods refuse it for what
    # it says: SendUpstream has no upstream here, a RouteNote over 4 KiB is INVALID_ARGUMENT).
    within = b"\x7a" + _varint(limit - 64) + b"x" * (limit - 64)
    try:
        await calls.raw_call(channels[calls.service_of(method)], method, [within], timeout=20)
    except grpc.aio.AioRpcError as err:
        assert err.code() != Code.RESOURCE_EXHAUSTED, (method, err.details())


async def test_a_survey_route_over_the_limit_is_resource_exhausted(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    route = [Point(latitude=800_000_000 + i, longitude=-1_700_000_000 - i) for i in range(20_000)]
    request = aggregator_pb2.SurveyRequest(message="too far", route=route)
    assert request.ByteSize() > MAX_REQUEST_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await calls.aggregator(channels["aggregator"]).Survey(request, timeout=20)
    assert error.value.code() == Code.RESOURCE_EXHAUSTED


async def test_a_survey_message_past_pings_limit_is_reported_as_pings_resource_exhausted(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient
) -> None:
    # The Survey fits the aggregator's limit; the message it passes on to ping does not fit ping's.
    request = aggregator_pb2.SurveyRequest(message="y" * (PING_MAX_REQUEST + 1024), area=calls.WORLD)
    reply = await calls.aggregator(channels["aggregator"]).Survey(request, timeout=20)
    assert [c.code for c in reply.calls] == [Code.RESOURCE_EXHAUSTED.value[0], 0, 0]
    assert reply.features and not reply.HasField("pong")


# Bytes that are not the method's message ----------------------------------------------------------------------
def _garbage(message_type: type[Message], seed: int) -> list[bytes]:
    """Fixed invalid encodings, and random byte strings that this message type cannot parse."""
    fixed = [b"\x0a\xff", b"\x00", b"\xff" * 10, b"\x08" + b"\x80" * 12, b"\x7a\xff\xff\xff\xff\x0f"]
    rng = random.Random(seed)
    found: list[bytes] = []
    for _ in range(1000):  # bounded: nearly every random string is invalid
        candidate = rng.randbytes(rng.randint(1, 64))
        try:
            message_type.FromString(candidate)
        except DecodeError:
            found.append(candidate)
            if len(found) == 3:
                break
    return fixed + found


REQUEST_TYPES: dict[str, type[Message]] = {
    "/ping.PingService/Send": ping_pb2.Request,
    "/ping.PingService/SendUpstream": ping_pb2.Request,
    "/routeguide.RouteGuide/GetFeature": Point,
    "/routeguide.RouteGuide/ListFeatures": Rectangle,
    "/routeguide.RouteGuide/RecordRoute": Point,
    "/routeguide.RouteGuide/RouteChat": RouteNote,
    "/aggregator.v1.Aggregator/Survey": aggregator_pb2.SurveyRequest,
    "/aggregator.v1.Aggregator/Tour": aggregator_pb2.TourStop,
}


async def _garbage_outcomes(
    channels: dict[str, grpc.aio.Channel], method: str
) -> list[tuple[grpc.StatusCode, str]]:
    outcomes = []
    for payload in _garbage(REQUEST_TYPES[method], seed=len(method)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await calls.raw_call(channels[calls.service_of(method)], method, [payload], timeout=10)
        outcomes.append((error.value.code(), error.value.details() or ""))
    return outcomes


@pytest.mark.parametrize("method", list(METHODS))
async def test_random_bytes_in_valid_framing_are_refused_and_the_server_keeps_serving(
    channels: dict[str, grpc.aio.Channel], steady: SteadyClient, method: str
) -> None:
    outcomes = await _garbage_outcomes(channels, method)
    assert {code for code, _ in outcomes} == {Code.INVALID_ARGUMENT}, outcomes


@pytest.mark.parametrize("method", ["/routeguide.RouteGuide/GetFeature", "/routeguide.RouteGuide/RouteChat"])
async def test_random_bytes_get_a_precise_status_and_no_traceback(
    stack: Stack, channels: dict[str, grpc.aio.Channel], method: str
) -> None:
    logged = len(stack.routeguide.lines)
    outcomes = await _garbage_outcomes(channels, method)
    assert {code for code, _ in outcomes} <= {Code.INVALID_ARGUMENT, Code.INTERNAL}, outcomes
    assert not any("<class" in details for _, details in outcomes)
    assert not any("Traceback" in line for line in stack.routeguide.lines[logged:])


# Frames no gRPC client sends ----------------------------------------------------------------------------------
VALID = {method: REQUEST_TYPES[method]().SerializeToString() for method in METHODS}
UNARY_REQUEST = [m for m, (streaming, _) in METHODS.items() if not streaming]
STREAMING_REQUEST = [m for m, (streaming, _) in METHODS.items() if streaming]
SHORT_DEADLINE = (("grpc-timeout", "500m"),)


@pytest.mark.parametrize("method", list(METHODS))
async def test_a_length_prefix_over_the_limit_is_resource_exhausted(
    stack: Stack, steady: SteadyClient, method: str
) -> None:
    port = {s.name: s.port for s in stack.all}[calls.service_of(method)]
    frames = [(h2c.grpc_message(b"x" * 10, declared=1 << 30), True)]
    outcome = await h2c.exchange("127.0.0.1", port, method, frames)
    assert outcome.grpc_status == Code.RESOURCE_EXHAUSTED.value[0], outcome
    assert (outcome.value("grpc-message") or "").startswith("SERVER: Received message larger than max")


@pytest.mark.parametrize("method", list(METHODS))
async def test_a_compressed_flag_without_an_encoding_is_internal(
    stack: Stack, steady: SteadyClient, method: str
) -> None:
    port = {s.name: s.port for s in stack.all}[calls.service_of(method)]
    frames = [(b"\x01" + h2c.grpc_message(VALID[method])[1:], True)]
    outcome = await h2c.exchange("127.0.0.1", port, method, frames)
    assert outcome.grpc_status == Code.INTERNAL.value[0], outcome
    assert outcome.value("grpc-message") == "Compression bit set but no encoding configured"


async def test_truncated_messages_on_unary_requests_end_at_once_or_at_the_deadline(
    stack: Stack, steady: SteadyClient
) -> None:
    # A unary call whose request stream ends without one whole message. On grpc.aio (routeguide, aggregator)
    # grpcio waits for the rest of a message the client said it would send, and the call's deadline ends the
    # wait (with no deadline it waits until the connection closes: Cloud Run's request timeout bounds that).
    # On grpc.server's threads (ping) the mesh reads the request itself: INVALID_ARGUMENT at once.
    async def one(method: str, frames: list[tuple[bytes, bool]]) -> h2c.Outcome:
        port = {s.name: s.port for s in stack.all}[calls.service_of(method)]
        return await h2c.exchange("127.0.0.1", port, method, frames, metadata=SHORT_DEADLINE)

    cases = []
    for method in UNARY_REQUEST:
        whole = h2c.grpc_message(VALID[method] or b"\x08\x01")
        cases += [(method, [(whole[:3], True)]), (method, [(h2c.grpc_message(b"\x08", declared=100), True)])]
        cases += [(method, [])]  # the request stream ends with no message at all
    outcomes = await asyncio.gather(*(one(method, frames) for method, frames in cases))
    threads = {method for method, _ in cases if calls.service_of(method) == "ping"}
    assert threads, "ping (the threads model) is among the services"
    expected = [
        (
            (Code.INVALID_ARGUMENT.value[0], f"no request message for {method}")
            if method in threads
            else (Code.DEADLINE_EXCEEDED.value[0], None)
        )
        for method, _ in cases
    ]
    found = [
        (o.grpc_status, o.value("grpc-message") if o.grpc_status == Code.INVALID_ARGUMENT.value[0] else None)
        for o in outcomes
    ]
    assert found == expected, outcomes


@pytest.mark.parametrize("method", STREAMING_REQUEST)
async def test_a_truncated_last_message_on_a_request_stream_is_dropped(
    stack: Stack, steady: SteadyClient, method: str
) -> None:
    # grpcio ends the request stream at the last whole message and discards the partial one.
    port = {s.name: s.port for s in stack.all}[calls.service_of(method)]
    first = FOUND if method.endswith("RecordRoute") else REQUEST_TYPES[method](location=FOUND)
    whole = h2c.grpc_message(first.SerializeToString())
    frames = [(whole, False), (whole[:7], True)]
    outcome = await h2c.exchange("127.0.0.1", port, method, frames, metadata=SHORT_DEADLINE)
    assert outcome.grpc_status == Code.OK.value[0], outcome
    if method.endswith("RecordRoute"):
        summary = route_guide_pb2.RouteSummary.FromString(outcome.data[5:])
        assert summary.point_count == 1


async def test_connections_dropped_mid_message_leave_the_server_serving(
    stack: Stack, steady: SteadyClient
) -> None:
    for method in METHODS:
        port = {s.name: s.port for s in stack.all}[calls.service_of(method)]
        for _ in range(5):
            frames = [(h2c.grpc_message(b"\x08\x01", declared=50), False)]
            await h2c.exchange("127.0.0.1", port, method, frames, close_after_send=True)
