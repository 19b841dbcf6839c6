"""ServerChain: span, identity and deadline together in one wrapper, on a real grpc.aio server.

Each part has its own tests (server_spans_test, identity_test, deadlines_test); these check how they meet:
what the handler sees at once, the span of a refused call, and which refusal comes first."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from emulators.identity import IdentityEmulator
from mesh import deadlines
from mesh.identity import TokenVerifier, current_caller
from mesh.server_chain import ServerChain
from mesh.testing import loopback
from ping import ping_pb2, ping_pb2_grpc

ALICE = "alice@proj.iam.gserviceaccount.com"
AUDIENCE = "https://svc.example"
SEND = "/ping.PingService/Send"
NOT_A_MESSAGE = b"\xff\xff\xff"  # wire type 7 does not exist: no protobuf parses this


class Ping(ping_pb2_grpc.PingServiceServicer):
    """Answers with what it sees: caller, time left for downstream calls, whether a span is current."""

    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        caller = current_caller()
        span = trace.get_current_span().get_span_context()
        seen = f"{caller.email if caller else None}|{deadlines.remaining(1000.0) < 100}|{span.is_valid}"
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=seen))

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no upstream in this test")
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as emu:
        yield emu


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def channel(
    emulator: IdentityEmulator, exporter: InMemorySpanExporter
) -> AsyncIterator[grpc.aio.Channel]:
    provider = TracerProvider()  # default sampler: every root call recorded
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier = TokenVerifier(AUDIENCE, emulator.certs_url, allowed_callers=frozenset({ALICE}))
    add = functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, Ping())
    async with loopback(add, chain=ServerChain(provider, verifier)) as served:
        opened = served.channel()
        yield opened
        await opened.close(None)


def codes(exporter: InMemorySpanExporter) -> list[tuple[str, Any, StatusCode]]:
    return [
        (s.name, (s.attributes or {}).get("rpc.grpc.status_code"), s.status.status_code)
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.SERVER
    ]


async def test_handler_sees_caller_deadline_and_span_at_once(
    channel: grpc.aio.Channel, emulator: IdentityEmulator, exporter: InMemorySpanExporter
) -> None:
    stub: Any = ping_pb2_grpc.PingServiceStub(channel)
    token = emulator.mint(ALICE, AUDIENCE)
    for _ in range(2):  # the second call takes the cached wrapper
        answer = await stub.Send(
            ping_pb2.Request(message="hi"), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        assert answer.pong.message == f"{ALICE}|True|True"
    assert codes(exporter) == [(SEND, 0, StatusCode.UNSET)] * 2


async def test_a_refused_call_has_its_span_and_no_caller(
    channel: grpc.aio.Channel, exporter: InMemorySpanExporter
) -> None:
    stub: Any = ping_pb2_grpc.PingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Send(ping_pb2.Request(message="hi"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in (refused.value.details() or "")
    # UNAUTHENTICATED is the client's fault: recorded as its code, not as a span error.
    assert codes(exporter) == [(SEND, grpc.StatusCode.UNAUTHENTICATED.value[0], StatusCode.UNSET)]


async def test_the_token_is_checked_before_the_parse_check(
    channel: grpc.aio.Channel, emulator: IdentityEmulator, exporter: InMemorySpanExporter
) -> None:
    send_bytes = channel.unary_unary(SEND, None, None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_bytes(NOT_A_MESSAGE, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    token = emulator.mint(ALICE, AUDIENCE)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await send_bytes(NOT_A_MESSAGE, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.details() == f"the request is not a valid message for {SEND}"
    assert [code for _, code, _ in codes(exporter)] == [16, 3]
