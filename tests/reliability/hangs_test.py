"""A downstream that hangs degrades an answer, never times it out: routeguide or ping-upstream frozen with SIGSTOP
(mid-call and between calls) and an address that accepts connections and never answers, on real processes.

The processes run with keepalive and connect timeouts of 1 s (FAST), so what takes up to 40 s with the
defaults takes about 2 s here; the deadline margin is the default (DOWNSTREAM_DEADLINE_MARGIN_SECONDS, 0.25 s).
Each test ends with the frozen process continued (SIGCONT) and calls succeeding again through the same caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from ping import ping_pb2
from routeguide.route_guide_pb2 import Point, Rectangle
from services.aggregator.survey import MAX_ROUTE_POINTS
from tests.reliability import calls
from tests.reliability.blackhole import BlackHole
from tests.reliability.figures import report
from tests.reliability.processes import Service, kill_all
from tests.reliability.stack import Stack, start_h2c

FAST = {
    "KEEPALIVE_TIME_SECONDS": "1",
    "KEEPALIVE_TIMEOUT_SECONDS": "1",
    "DOWNSTREAM_CONNECT_TIMEOUT_SECONDS": "1",
}
DEADLINE = 3.0  # the caller's
AREA = Rectangle(
    lo=Point(latitude=400_000_000, longitude=-750_000_000),
    hi=Point(latitude=420_000_000, longitude=-730_000_000),
)
Code = grpc.StatusCode
DEGRADED = {Code.DEADLINE_EXCEEDED.name, Code.UNAVAILABLE.name}
_NAMES = {code.value[0]: code.name for code in Code}


def codes(reply: aggregator_pb2.SurveyResponse) -> list[str]:
    """The codes of ping.Send, ListFeatures, RecordRoute."""
    return [_NAMES[call.code] for call in reply.calls]


def latencies_ms(reply: aggregator_pb2.SurveyResponse) -> list[int]:
    return [call.latency.ToMilliseconds() for call in reply.calls]


def route(points: int) -> list[Point]:
    return [Point(latitude=i * 100, longitude=i * 100) for i in range(points)]


def small(message: str) -> aggregator_pb2.SurveyRequest:
    return aggregator_pb2.SurveyRequest(message=message, area=AREA, route=route(10))


@contextlib.contextmanager
def frozen(service: Service) -> Iterator[None]:
    """The process stopped (SIGSTOP: its sockets stay open, nothing answers) for the block, then continued."""
    service.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        service.signal(signal.SIGCONT)


class Timer:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()

    @property
    def seconds(self) -> float:
        return round(self._loop.time() - self._started, 3)


@dataclass(frozen=True)
class Timed:
    reply: aggregator_pb2.SurveyResponse
    seconds: float


async def first_and_second(stub: aggregator_pb2_grpc.AggregatorAsyncStub) -> tuple[Timed, Timed]:
    """Two Surveys one after the other, each timed: the first meets the fault, the second what gRPC made of it."""
    surveys = []
    for message in ("first", "second"):
        timer = Timer()
        reply = await stub.Survey(small(message), timeout=DEADLINE)
        surveys.append(Timed(reply, timer.seconds))
    return surveys[0], surveys[1]


async def healed(stub: aggregator_pb2_grpc.AggregatorAsyncStub) -> tuple[list[str], float]:
    """Surveys until every downstream call is OK again (bounded: gRPC reconnects with a backoff capped at
    10 s by mesh.client's Channels); the last codes and the time it took."""
    timer, found = Timer(), [""]
    for _ in range(60):
        found = codes(await stub.Survey(small("again"), timeout=DEADLINE))
        if found == ["OK"] * 3:
            break
        await asyncio.sleep(0.25)
    return found, timer.seconds


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    started = await start_h2c(FAST)
    yield started
    await kill_all(started.all)


async def test_survey_answers_in_part_within_its_deadline_when_routeguide_freezes_mid_call(
    stack: Stack,
) -> None:
    aggregator = stack.aggregator
    pid = aggregator.pid
    async with calls.insecure(aggregator.address) as channel:
        stub = calls.aggregator(channel)
        assert codes(await stub.Survey(small("warm"), timeout=10)) == ["OK"] * 3
        timer = Timer()
        # Frozen on a connection just used (well within keepalive's 2 s): the Survey's calls go out on it and
        # wait, in flight, for a routeguide that no longer answers. (A route at the cap uploads too fast to
        # freeze routeguide in the middle of it by waiting.)
        with frozen(stack.routeguide):
            request = aggregator_pb2.SurveyRequest(message="frozen", route=route(MAX_ROUTE_POINTS))
            # An answer, not DEADLINE_EXCEEDED: the margin left time to give it.
            reply = await stub.Survey(request, timeout=DEADLINE)
            answered = timer.seconds
        assert reply.pong.message == "frozen" and codes(reply)[0] == "OK"
        # Out of time, or cut off by keepalive mid-upload; a client stream whose connection breaks while it
        # writes may be ended by gRPC core with INTERNAL "Internal error from Core" instead (as in faults_test).
        assert codes(reply)[2] in {*DEGRADED, "INTERNAL"}, reply.calls
        assert not reply.HasField("route_summary")
        after, healing = await healed(stub)
        assert after == ["OK"] * 3
    assert aggregator.pid == pid and aggregator.returncode is None  # the caller was never restarted
    report(
        "survey, routeguide frozen mid-call",
        {
            "deadline_s": DEADLINE,
            "answered_s": answered,
            "codes": codes(reply),
            "healed_after_sigcont_s": healing,
        },
    )


async def test_routeguide_frozen_between_calls_is_dropped_by_keepalive_then_failed_fast(stack: Stack) -> None:
    aggregator = stack.aggregator
    pid = aggregator.pid
    async with calls.insecure(aggregator.address) as channel:
        stub = calls.aggregator(channel)
        assert codes(await stub.Survey(small("warm"), timeout=10)) == ["OK"] * 3
        with frozen(stack.routeguide):
            await asyncio.sleep(3)  # past the keepalive bound (1 s + 1 s): the idle connection is dropped
            first, second = await first_and_second(stub)
        # Not the deadline: the reconnection got no HTTP/2 SETTINGS within the connect timeout, and from then on
        # the channel (TRANSIENT_FAILURE) fails routeguide's calls at once.
        for reply in (first.reply, second.reply):
            assert codes(reply) == ["OK", "UNAVAILABLE", "UNAVAILABLE"], reply.calls
        after, healing = await healed(stub)
        assert after == ["OK"] * 3
    assert aggregator.pid == pid and aggregator.returncode is None
    report(
        "survey, routeguide frozen between calls",
        {
            "first_s": first.seconds,
            "first_calls_ms": latencies_ms(first.reply),
            "second_s": second.seconds,
            "second_calls_ms": latencies_ms(second.reply),
            "healed_after_sigcont_s": healing,
        },
    )


async def test_the_relay_answers_within_its_deadline_naming_a_frozen_upstream_and_recovers() -> None:
    upstream = await Service("ping-upstream", FAST, kind="ping").start()
    relay = await Service(
        "ping", {"GRPC_PING_HOST": upstream.address, "GRPC_PING_INSECURE": "1", **FAST}
    ).start()
    try:
        pid = relay.pid
        async with calls.insecure(relay.address) as channel:
            stub = calls.ping(channel)
            assert (await stub.SendUpstream(ping_pb2.Request(message="warm"), timeout=10)).pong.index == 1
            with frozen(upstream):
                timer = Timer()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.SendUpstream(ping_pb2.Request(message="frozen"), timeout=2)
                answered = timer.seconds
            # The relay's own status, sent before the caller's deadline (a local timeout would say only
            # "Deadline Exceeded").
            assert failed.value.code().name in DEGRADED
            assert (failed.value.details() or "").startswith(f"upstream {upstream.address}: "), failed.value
            timer = Timer()
            for _ in range(60):
                try:
                    await stub.SendUpstream(ping_pb2.Request(message="again"), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.25)
            healing = timer.seconds
            reply = await stub.SendUpstream(ping_pb2.Request(message="healed"), timeout=2)
            assert reply.pong.message == "healed (relayed)"
        assert relay.pid == pid and relay.returncode is None
    finally:
        await kill_all([relay, upstream])
    report(
        "relay, upstream frozen",
        {
            "deadline_s": 2,
            "answered_s": answered,
            "code": failed.value.code().name,
            "healed_after_sigcont_s": healing,
        },
    )


async def test_an_address_that_accepts_and_never_answers_degrades_survey_and_relay() -> None:
    async with BlackHole() as hole:
        ping = await Service("ping", FAST).start()
        aggregator = await Service(
            "aggregator",
            {"PING_ADDR": ping.address, "ROUTEGUIDE_ADDR": hole.address, "UPSTREAM_INSECURE": "1", **FAST},
        ).start()
        # With the default connect timeout (5 s), longer than the call's deadline: the margin answers.
        relay = await Service(
            "ping-relay", {"GRPC_PING_HOST": hole.address, "GRPC_PING_INSECURE": "1"}, kind="ping"
        ).start()
        try:
            async with calls.insecure(aggregator.address) as channel:
                stub = calls.aggregator(channel)
                first, second = await first_and_second(stub)
            for reply in (first.reply, second.reply):
                assert codes(reply) == ["OK", "UNAVAILABLE", "UNAVAILABLE"], reply.calls
                assert reply.pong.message in ("first", "second")
            async with calls.insecure(relay.address) as channel:
                timer = Timer()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await calls.ping(channel).SendUpstream(ping_pb2.Request(message="void"), timeout=2)
                relayed_s = timer.seconds
            assert failed.value.code() == Code.DEADLINE_EXCEEDED
            assert (failed.value.details() or "").startswith(f"upstream {hole.address}: "), failed.value
        finally:
            await kill_all([aggregator, relay, ping])
        assert hole.accepted >= 2  # connections were made (a black hole, not a refused port)
    report(
        "black hole",
        {
            "survey_first_s": first.seconds,
            "survey_first_calls_ms": latencies_ms(first.reply),
            "survey_second_s": second.seconds,
            "survey_second_calls_ms": latencies_ms(second.reply),
            "relay_deadline_s": 2,
            "relay_answered_s": relayed_s,
        },
    )


async def test_a_tour_whose_routeguide_freezes_ends_within_its_deadline_naming_routeguide(
    stack: Stack,
) -> None:
    next_stop = asyncio.Event()

    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=Point(latitude=5, longitude=5), note="before")
        await next_stop.wait()
        yield aggregator_pb2.TourStop(location=Point(latitude=6, longitude=6), note="frozen")
        await asyncio.sleep(DEADLINE)  # the tour stays open: only the failure (or the deadline) can end it

    async with calls.insecure(stack.aggregator.address) as channel:
        tour = calls.aggregator(channel).Tour(stops(), timeout=DEADLINE)
        first = await asyncio.wait_for(tour.read(), 5)
        assert first.arrival.stop == 0 and not first.arrival.HasField("failure")
        later: list[aggregator_pb2.TourUpdate] = []
        with frozen(stack.routeguide):
            timer = Timer()
            next_stop.set()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (update := await tour.read()) is not calls.EOF_:
                    later.append(update)
            answered = timer.seconds
    # The aggregator's own status, in the margin or sooner (keepalive): not the caller's local deadline.
    assert ended.value.code().name in DEGRADED
    assert (ended.value.details() or "").startswith("routeguide: "), ended.value
    # A stop looked up meanwhile is reported as failed, never as found.
    for update in later:
        assert not update.HasField("arrival") or update.arrival.HasField("failure"), update
    report(
        "tour, routeguide frozen",
        {"deadline_s": DEADLINE, "ended_s": answered, "code": ended.value.code().name},
    )
