"""Admission from the headers alone, against a routeguide process that verifies tokens: a call without a token is
refused before any of its message is read, on all four kinds of call, so callers with no token holding
near-limit messages open cost the server nothing; and one connection holds at most 512 streams.
Raw HTTP/2 (`h2c.Streams`): requests whose message never completes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from emulators.identity import IdentityEmulator
from mesh.client import MAX_MESSAGE_BYTES
from mesh.serving import MAX_STREAMS_PER_CONNECTION
from tests.reliability import h2c
from tests.reliability.figures import report
from tests.reliability.identity_attacks_test import METHODS, verifying
from tests.reliability.processes import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

UNAUTHENTICATED = 16
STREAMS = 40  # as in the review: 40 streams, each holding a message of nearly the old 4 MiB limit


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routeguide(emulator: IdentityEmulator) -> AsyncIterator[Service]:
    service = await Service("routeguide", verifying(emulator)).start()
    yield service
    assert await service.stop() == 0


def near_limit_message() -> bytes:
    """A message prefix declaring nearly 4 MiB, and that many bytes; sent without END_STREAM."""
    size = MAX_MESSAGE_BYTES - 1024
    return h2c.grpc_message(b"\x7a" + b"x" * (size - 1))[: size + 5]


async def test_a_call_without_a_token_is_refused_before_its_message_is_read(routeguide: Service) -> None:
    # One stream per kind of call, each with 1 KiB of a message that declares nearly 4 MiB: no message is
    # whole, so only a verdict from the headers can answer them.
    streams = await h2c.Streams.open("127.0.0.1", routeguide.port)
    try:
        opened = {method: streams.start(method, body=near_limit_message()[:1024]) for method in METHODS}
        await streams.pump(lambda: all(streams.done(s) for s in opened.values()), timeout=5)
        answers = {method: streams.outcomes[s] for method, s in opened.items()}
    finally:
        await streams.close()
    for method, answer in answers.items():
        assert answer.grpc_status == UNAUTHENTICATED, (method, answer)
        assert (answer.value("grpc-message") or "").startswith("missing credentials"), (method, answer)


async def test_callers_without_a_token_holding_near_limit_messages_cost_no_memory(
    routeguide: Service,
) -> None:
    before = routeguide.usage()
    streams = await h2c.Streams.open("127.0.0.1", routeguide.port)
    try:
        held = [streams.start(METHODS[i % len(METHODS)], body=near_limit_message()) for i in range(STREAMS)]
        # Send as much of the 40 messages as the server's flow control takes, until each is answered (8 s at most).
        await streams.pump(lambda: all(streams.done(s) for s in held), timeout=8)
        during = routeguide.usage()
        answered = [streams.outcomes[s].grpc_status for s in held]
    finally:
        await streams.close()
    after = routeguide.usage()
    report(
        "40 callers without a token holding near-4-MiB messages",
        {"rss_kb": [before.rss_kb, during.rss_kb, after.rss_kb], "answered": answered.count(UNAUTHENTICATED)},
    )
    assert answered == [UNAUTHENTICATED] * STREAMS
    assert during.rss_kb - before.rss_kb < 16 * 1024, (before, during)


async def test_one_connection_holds_at_most_512_streams(routeguide: Service) -> None:
    streams = await h2c.Streams.open("127.0.0.1", routeguide.port)
    try:
        await streams.pump(lambda: streams.server_max_streams < 2**31, timeout=5)  # the server's SETTINGS
        announced = streams.server_max_streams
    finally:
        await streams.close()
    assert announced == MAX_STREAMS_PER_CONNECTION == 512
