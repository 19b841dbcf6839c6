"""PingService: the Cloud Run grpc-ping sample's behaviour."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from mesh import Threads, never_waits, reported
from ping import ping_pb2, ping_pb2_grpc

NO_UPSTREAM = "no upstream configured: set GRPC_PING_HOST to the upstream's host:port to use SendUpstream"


def pong(request: ping_pb2.Request) -> ping_pb2.Response:
    """Send's answer: the message echoed, with the time it was received."""
    received = Timestamp()
    received.GetCurrentTime()
    return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message, received_on=received))


class PingServicer(ping_pb2_grpc.PingServiceServicer):
    """Written for the threads model (mesh.ThreadsModel: BENCHMARKS.md, "Serving model"); the upstream is a
    grpc.aio stub on the process's channels, called through `threads` (mesh.Threads)."""

    def __init__(
        self,
        upstream: ping_pb2_grpc.PingServiceAsyncStub | None = None,
        upstream_name: str = "",
        threads: Threads | None = None,
    ) -> None:
        if upstream is not None and threads is None:
            raise ValueError("an upstream stub needs the event loop its channel lives on (Runtime.threads())")
        self._upstream = upstream
        self._upstream_name = upstream_name
        self._threads = threads

    @never_waits
    def Send(self, request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
        return pong(request)

    def SendUpstream(self, request: ping_pb2.Request, context: grpc.ServicerContext) -> ping_pb2.Response:
        if self._upstream is None or self._threads is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_UPSTREAM)
            raise AssertionError("abort raises")
        try:
            reply = self._threads.run(self._relay(request.message), context)
        except grpc.aio.AioRpcError as err:
            # Keep the upstream's code so callers can tell "upstream unavailable" from "upstream said no".
            context.abort(err.code(), f"upstream {self._upstream_name}: {reported(self._upstream_name, err)}")
        return ping_pb2.Response(pong=reply.pong)

    async def _relay(self, message: str) -> ping_pb2.Response:
        # The call is made on the loop: a grpc.aio call object belongs to the loop it is created on.
        assert self._upstream is not None
        return await self._upstream.Send(ping_pb2.Request(message=f"{message} (relayed)"))
