"""Instances as Cloud Run runs them (the shared library's server, h2c on a free loopback port, K_REVISION
set), answering with their revision's name; and a caller outside Cloud Run, which reaches a service over
TLS by its `run.app` name, through the front end."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from cloudrun.frontend import FrontEnd
from emulators.dev_ca import DevCerts
from mesh import serving
from mesh.testing import NO_REUSEPORT, eventually, running
from ping import ping_pb2, ping_pb2_grpc

PROJECT_NUMBER = "123456789012"
REGION = "europe-west1"
CALL_TIMEOUT_S = 10.0


class Revisioned(ping_pb2_grpc.PingServiceServicer):
    """Send answers with the revision and the port of the instance that served it."""

    def __init__(self, revision: str, port: list[int]) -> None:
        self.revision = revision
        self.port = port

    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        if request.message.startswith("sleep "):  # a call that outlives its revision's timeout
            await asyncio.sleep(float(request.message.removeprefix("sleep ")))
        return ping_pb2.Response(pong=ping_pb2.Pong(message=f"{self.revision}@{self.port[0]}"))

    async def SendUpstream(
        self, request: ping_pb2.Request, context: grpc.aio.ServicerContext
    ) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "an instance of these tests has no upstream")
        raise AssertionError("abort raises")


@contextlib.asynccontextmanager
async def instance(revision: str) -> AsyncIterator[serving.RunningServer]:
    """One instance of `revision` until the block ends, then drained (calls in flight finish)."""
    port: list[int] = [0]

    def build(runtime: serving.Runtime) -> list[serving.Service]:
        servicer = Revisioned(runtime.env["K_REVISION"], port)
        return [
            serving.Service("ping.PingService", servicer, ping_pb2_grpc.add_PingServiceServicer_to_server)
        ]

    async with running("ping", build, {"K_REVISION": revision}) as server:
        port[0] = server.port
        yield server


def channel(front: FrontEnd, certs: DevCerts, host: str) -> grpc.aio.Channel:
    """A caller's one connection to `host` (e.g. `ping-123.europe-west1.run.app:443`): TLS with the CA, the name
    as the TLS server name and :authority, the socket to the front end's loopback port."""
    name = host.rpartition(":")[0] if host.endswith(":443") else host
    credentials = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
    options = [*NO_REUSEPORT, ("grpc.ssl_target_name_override", name), ("grpc.default_authority", host)]
    return grpc.aio.secure_channel(front.address, credentials, options=options)


async def answers(
    stub: ping_pb2_grpc.PingServiceStub, calls: int, at_once: int = 20
) -> collections.Counter[str]:
    """Who answered `calls` Sends (`revision@port`), `at_once` in flight on the stub's one connection."""
    seen: collections.Counter[str] = collections.Counter()
    for start in range(0, calls, at_once):
        batch = [
            stub.Send(ping_pb2.Request(message="who"), timeout=CALL_TIMEOUT_S)
            for _ in range(min(at_once, calls - start))
        ]
        for reply in await asyncio.gather(*batch):
            seen[reply.pong.message] += 1
    return seen


def by_revision(seen: collections.Counter[str]) -> collections.Counter[str]:
    revisions: collections.Counter[str] = collections.Counter()
    for answer, count in seen.items():
        revisions[answer.partition("@")[0]] += count
    return revisions


def ports(*servers: serving.RunningServer) -> Sequence[int]:
    return [s.port for s in servers]


class Load:
    """Callers sending Send in a loop over one stub, counting who answered and the codes of what failed."""

    def __init__(self) -> None:
        self.answered: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[grpc.StatusCode] = collections.Counter()

    def total(self) -> int:
        return sum(self.answered.values())

    async def more(self, calls: int) -> collections.Counter[str]:
        """Who answered the next `calls` calls (at least), once they are answered."""
        before = self.answered.copy()
        await eventually(lambda: self.total() >= sum(before.values()) + calls, within=20, what="the load")
        return self.answered - before


@contextlib.asynccontextmanager
async def load(stub: ping_pb2_grpc.PingServiceStub, callers: int = 8) -> AsyncIterator[Load]:
    """`callers` loops of Send on `stub` until the block ends (each bounded in count)."""

    async def send() -> str:
        reply = await stub.Send(ping_pb2.Request(message="load"), timeout=CALL_TIMEOUT_S)
        return reply.pong.message

    async with looping(send, callers) as seen:
        yield seen


@contextlib.asynccontextmanager
async def looping(call: Callable[[], Awaitable[str]], callers: int = 8) -> AsyncIterator[Load]:
    """`callers` loops of `call` (which answers who served it) until the block ends (each bounded in count)."""
    seen, done = Load(), asyncio.Event()

    async def caller() -> None:
        for _ in range(20_000):
            if done.is_set():
                return
            try:
                answer = await call()
            except grpc.aio.AioRpcError as error:
                seen.failed[error.code()] += 1
            else:
                seen.answered[answer] += 1

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    try:
        yield seen
    finally:
        done.set()
        await asyncio.gather(*tasks)
