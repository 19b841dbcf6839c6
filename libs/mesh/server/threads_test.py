"""The threads serving model (ping): a call's downstream call runs on the process's loop and ends with the
call, the drain lets relays in flight finish, every call starts with a context of its own, and the methods
that never wait run on the few quick threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading

import grpc
import pytest

from mesh import Runtime, Service
from mesh.server import ThreadsModel, never_waits
from mesh.server._threads import QUICK_THREADS
from mesh.testing import NO_REUSEPORT, eventually, loopback, running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build
from services.ping.servicer import pong


class SlowUpstream(ping_pb2_grpc.PingServiceServicer):
    """A grpc.aio upstream whose Send takes `seconds`; counts arrivals and calls cancelled while it waits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.arrived = 0
        self.cancelled = 0

    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        self.arrived += 1
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return pong(request)

    async def SendUpstream(
        self, request: ping_pb2.Request, context: grpc.aio.ServicerContext
    ) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the end of the line")
        raise AssertionError("abort raises")


def relay_env(address: str) -> dict[str, str]:
    return {"GRPC_PING_HOST": address, "GRPC_PING_INSECURE": "true"}


def ping(port: int) -> tuple[grpc.aio.Channel, ping_pb2_grpc.PingServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_REUSEPORT)
    return channel, ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]


async def test_the_drain_lets_the_relays_in_flight_finish() -> None:
    slow = SlowUpstream(0.5)
    async with loopback(functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, slow)) as up:
        async with running("ping", build, relay_env(up.address)) as relay:
            channel, stub = ping(relay.port)
            relays = [
                asyncio.ensure_future(stub.SendUpstream(ping_pb2.Request(message=f"r{n}"), timeout=10))
                for n in range(8)
            ]
            await eventually(lambda: slow.arrived == 8, what="all 8 relays at the upstream")
        # The block's end stopped the server: SIGTERM's drain, with the 8 calls still waiting upstream.
        replies = await asyncio.gather(*relays)
        await channel.close()
    assert [r.pong.message for r in replies] == [f"r{n} (relayed)" for n in range(8)]
    assert slow.cancelled == 0


async def test_a_call_that_ends_first_cancels_its_downstream_call() -> None:
    slow = SlowUpstream(30)
    async with loopback(functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, slow)) as up:
        async with running("ping", build, relay_env(up.address)) as relay:
            channel, stub = ping(relay.port)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.SendUpstream(ping_pb2.Request(message="late"), timeout=0.5)
            cancelled = await eventually(lambda: slow.cancelled == 1, what="the upstream call cancelled")
            # The relay keeps serving.
            assert (await stub.Send(ping_pb2.Request(message="still"), timeout=5)).pong.message == "still"
            await channel.close()
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled


SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="nothing")


def echo_seen(request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
    """Answers what the call's context held when it came in, then leaves the request's message in it."""
    found = SEEN.get()
    SEEN.set(request.message)
    return ping_pb2.Response(pong=ping_pb2.Pong(message=found))


async def test_every_call_starts_with_a_context_of_its_own_on_a_reused_thread() -> None:
    class Entered:
        pending = None
        arrival = None

    handler = ThreadsModel().wrap(
        grpc.unary_unary_rpc_method_handler(
            echo_seen,
            request_deserializer=ping_pb2.Request.FromString,
            response_serializer=ping_pb2.Response.SerializeToString,
        ),
        lambda context: Entered(),
        lambda *ended: None,
        "/ping.PingService/Send",
        headers_first=False,
    )
    one_thread = concurrent.futures.ThreadPoolExecutor(1)  # both calls on the same thread
    server = grpc.server(one_thread, options=NO_REUSEPORT)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("ping.PingService", {"Send": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel, stub = ping(port)
        seen = [(await stub.Send(ping_pb2.Request(message=m), timeout=5)).pong.message for m in "ab"]
        await channel.close()
    finally:
        await asyncio.to_thread(server.stop(None).wait)
    assert seen == ["nothing", "nothing"]


class WhereServed(ping_pb2_grpc.PingServiceServicer):
    """Answers with the name of the thread each call ran on."""

    @never_waits
    def Send(self, request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(message=threading.current_thread().name))

    def SendUpstream(self, request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(message=threading.current_thread().name))


def where_served(runtime: Runtime) -> list[Service]:
    add = ping_pb2_grpc.add_PingServiceServicer_to_server
    return [Service("ping.PingService", WhereServed(), add, model=ThreadsModel)]


async def test_a_method_that_never_waits_runs_on_the_quick_threads_the_others_on_the_pool() -> None:
    async with running("ping", where_served) as server:
        channel, stub = ping(server.port)
        quick = {(await stub.Send(ping_pb2.Request(), timeout=5)).pong.message for _ in range(20)}
        pooled = (await stub.SendUpstream(ping_pb2.Request(), timeout=5)).pong.message
        await channel.close()
    assert all(name.startswith("quick") for name in quick), quick
    assert len(quick) <= QUICK_THREADS
    assert pooled.startswith("call"), pooled
