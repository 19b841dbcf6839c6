"""PingService: the Cloud Run grpc-ping sample's behaviour."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.downstream import reported
from ping import ping_pb2, ping_pb2_grpc

NO_UPSTREAM = "no upstream configured: set GRPC_PING_HOST to the upstream's host:port to use SendUpstream"


def pong(request: ping_pb2.Request) -> ping_pb2.Response:
    """Send's answer: the message echoed, with the time it was received."""
    received = Timestamp()
    received.GetCurrentTime()
    return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message, received_on=received))


class PingServicer(ping_pb2_grpc.PingServiceServicer):
    def __init__(
        self, upstream: ping_pb2_grpc.PingServiceAsyncStub | None = None, upstream_name: str = ""
    ) -> None:
        self._upstream = upstream
        self._upstream_name = upstream_name

    async def Send(self, request: ping_pb2.Request, context: grpc.aio.ServicerContext) -> ping_pb2.Response:
        return pong(request)

    async def SendUpstream(
        self, request: ping_pb2.Request, context: grpc.aio.ServicerContext
    ) -> ping_pb2.Response:
        if self._upstream is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_UPSTREAM)
            raise AssertionError("abort raises")
        try:
            reply = await self._upstream.Send(ping_pb2.Request(message=f"{request.message} (relayed)"))
        except grpc.aio.AioRpcError as err:
            # Keep the upstream's code so callers can tell "upstream unavailable" from "upstream said no".
            await context.abort(
                err.code(), f"upstream {self._upstream_name}: {reported(self._upstream_name, err)}"
            )
        return ping_pb2.Response(pong=reply.pong)
