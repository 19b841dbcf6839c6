"""The ping service's process. One image serves both roles of the sample: `ping` (relays to GRPC_PING_HOST)
and `ping-upstream` (no upstream)."""

from __future__ import annotations

from collections.abc import Sequence

from mesh import Runtime, Service, ThreadsModel, Upstream, main
from ping import ping_pb2_grpc
from services.ping.servicer import PingServicer

SERVICE_NAME = "ping.PingService"
MAX_REQUEST = 64 * 1024  # a Request is one message string: a ping, not a payload
# BENCHMARKS.md, "Serving model": per core, ping is faster on grpc.server's threads than on grpc.aio.
MODEL = ThreadsModel


def build(runtime: Runtime) -> Sequence[Service]:
    # The grpc-ping sample's variables: upstream host:port, plaintext upstream, no ID token.
    upstream = Upstream.from_env(
        runtime.env,
        "GRPC_PING_HOST",
        insecure_var="GRPC_PING_INSECURE",
        unauthenticated_var="GRPC_PING_UNAUTHENTICATED",
    )
    stub = None
    if upstream:
        channel = runtime.channel(upstream, idempotent=[f"{SERVICE_NAME}/Send"])
        stub = ping_pb2_grpc.PingServiceStub(channel)
    servicer = PingServicer(stub, upstream.address if upstream else "", runtime.threads())  # type: ignore[arg-type]
    return [
        Service(
            SERVICE_NAME,
            servicer,
            ping_pb2_grpc.add_PingServiceServicer_to_server,
            max_request_bytes=MAX_REQUEST,
            model=MODEL,
        )
    ]


if __name__ == "__main__":
    main("ping", build)
