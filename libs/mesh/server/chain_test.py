"""ServerChain: span, identity and deadline together in one wrapper, on a real server of either model.

Each part has its own tests (spans_test, identity_test, deadlines_test); these check how they meet:
what the handler sees at once, which refusal comes first, and the spans of admitted and refused calls: a refused
call records none, whatever its caller's trace context asks for, and is still counted in the metrics."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from emulators.identity import IdentityEmulator
from mesh import deadlines
from mesh.server import AsyncioModel, ServerChain, ServingModel, ThreadsModel, TokenVerifier, current_caller
from mesh.testing import loopback
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc

ALICE = "alice@proj.iam.gserviceaccount.com"
AUDIENCE = "https://svc.example"
SEND = "/ping.PingService/Send"
NOT_A_MESSAGE = b"\xff\xff\xff"  # wire type 7 does not exist: no protobuf parses this


def _seen() -> ping_pb2.Response:
    """What a handler sees: caller, time left for downstream calls, whether a span is current."""
    caller = current_caller()
    span = trace.get_current_span().get_span_context()
    seen = f"{caller.email if caller else None}|{deadlines.remaining(1000.0) < 100}|{span.is_valid}"
    return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=seen))


class Ping(ping_pb2_grpc.PingServiceServicer):
    """Answers with what it sees (grpc.aio)."""

    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return _seen()

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


async def test_a_refused_call_has_no_span_and_no_caller(
    channel: grpc.aio.Channel, exporter: InMemorySpanExporter
) -> None:
    stub: Any = ping_pb2_grpc.PingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Send(ping_pb2.Request(message="hi"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in (refused.value.details() or "")
    assert codes(exporter) == []


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
    assert [code for _, code, _ in codes(exporter)] == [3]  # the refused call has no span


class ThreadsPing(ping_pb2_grpc.PingServiceServicer):
    """Answers with what it sees (the threads model)."""

    def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return _seen()

    def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no upstream in this test")
        raise AssertionError("unreachable")


BOB = "bob@proj.iam.gserviceaccount.com"  # verified, not on the allow-list
CALLER_SPAN = 0x00F067AA0BA902B7
SAMPLED = (("traceparent", f"00-0af7651916cd43dd8448eb211c80319c-{CALLER_SPAN:016x}-01"),)


@pytest.mark.parametrize("model", [AsyncioModel, ThreadsModel], ids=["asyncio", "threads"])
async def test_refused_calls_with_sampled_parents_export_nothing_and_are_counted(
    emulator: IdentityEmulator, model: type[ServingModel]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))  # only a sampled caller makes a span record
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    fetched_before = len(emulator.certs_requested_at())
    verifier = TokenVerifier(AUDIENCE, emulator.certs_url, allowed_callers=frozenset({ALICE}))
    chain = ServerChain(provider, verifier, meters=MeterProvider(metric_readers=[reader]))
    add = functools.partial(
        ping_pb2_grpc.add_PingServiceServicer_to_server, ThreadsPing() if model is ThreadsModel else Ping()
    )
    alice = emulator.mint(ALICE, AUDIENCE)
    refused = {
        "no token": (),
        "not a token": (("authorization", "Bearer not.a.token"),),
        "another audience": (("authorization", f"Bearer {emulator.mint(ALICE, 'https://elsewhere')}"),),
        "a stranger, new": (("authorization", f"Bearer {emulator.mint(BOB, AUDIENCE)}"),),
    }
    refused["a stranger, seen before"] = refused["a stranger, new"]
    async with loopback(add, chain=chain, model=model) as served, served.channel() as channel:
        stub: Any = ping_pb2_grpc.PingServiceStub(channel)
        for _ in range(2):  # a new token (verified first, the certs fetched then), then the same one
            answer = await stub.Send(
                ping_pb2.Request(), metadata=(*SAMPLED, ("authorization", f"Bearer {alice}")), timeout=10
            )
            assert answer.pong.message == f"{ALICE}|True|True"
        codes_seen = {}
        for what, metadata in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Send(ping_pb2.Request(), metadata=(*SAMPLED, *metadata), timeout=10)
            codes_seen[what] = error.value.code()
    assert codes_seen == {
        "no token": grpc.StatusCode.UNAUTHENTICATED,
        "not a token": grpc.StatusCode.UNAUTHENTICATED,
        "another audience": grpc.StatusCode.UNAUTHENTICATED,
        "a stranger, new": grpc.StatusCode.PERMISSION_DENIED,
        "a stranger, seen before": grpc.StatusCode.PERMISSION_DENIED,
    }
    # The admitted calls only, each a child of the caller's span.
    first, second = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert all(s.parent is not None and s.parent.span_id == CALLER_SPAN for s in (first, second))
    # The new token's span covers its verification (the certs fetch), as when it opened at the call's entry.
    (fetched,) = emulator.certs_requested_at()[fetched_before:]
    assert first.start_time is not None and first.end_time is not None
    assert first.start_time <= fetched <= first.end_time
    # The refusals are still counted, by code.
    counted = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "rpc.server.duration":
                    for point in metric.data.data_points:
                        counted[(point.attributes or {})["rpc.grpc.status_code"]] = point.count  # type: ignore[union-attr]
    assert counted == {0: 2, 16: 3, 7: 2}


async def written_chat(notes: AsyncIterator[route_guide_pb2.RouteNote], context: Any) -> None:
    """RouteChat as a coroutine that writes its responses with `context.write` (as grpc's own health Watch
    does), not as an async generator."""
    async for note in notes:
        await context.write(note)


def add_written_chat(server: Any) -> None:
    chat = grpc.stream_stream_rpc_method_handler(
        written_chat,
        request_deserializer=route_guide_pb2.RouteNote.FromString,
        response_serializer=route_guide_pb2.RouteNote.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("routeguide.RouteGuide", {"RouteChat": chat})]
    )


async def test_a_request_stream_answered_by_context_write_is_told_it_is_admitted_before_it_writes() -> None:
    """Every wrapper of a request stream sends the response headers once the call is admitted (a client may
    wait for them before it writes: mesh.server._calls.ADMITTED); the one for a handler that writes with
    `context.write` too, not only the generator's and the one-response wrappers."""
    async with loopback(add_written_chat, chain=ServerChain()) as served, served.channel() as channel:
        stub: Any = route_guide_pb2_grpc.RouteGuideStub(channel)
        call = stub.RouteChat(timeout=30)
        # Nothing written yet: only the admission can send the headers.
        await asyncio.wait_for(call.initial_metadata(), 10)
        await call.write(route_guide_pb2.RouteNote(message="after the headers"))
        reply = await call.read()
        await call.done_writing()
    assert reply.message == "after the headers"
