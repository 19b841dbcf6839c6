"""One downstream call, timed and reported: what Survey and Tour answer with when a downstream fails."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from aggregator.v1 import aggregator_pb2
from mesh import reported

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """A downstream call's result (None when it failed), its report, and its error when it failed."""

    result: T | None
    call: aggregator_pb2.DownstreamCall
    error: grpc.aio.AioRpcError | None = None


async def timed(method: str, call: Callable[[], Awaitable[T]]) -> Outcome[T]:
    """Runs `call`; a failure is reported, not raised. Its deadline is the one mesh.deadlines gives every
    downstream call: the incoming deadline less a margin, so that there is time left to answer."""
    started = time.perf_counter()
    result: T | None = None
    error: grpc.aio.AioRpcError | None = None
    try:
        result = await call()
        code, message = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        error, code, message = err, err.code(), reported(method, err)  # the details logged, not forwarded
    latency = Duration()
    latency.FromNanoseconds(int((time.perf_counter() - started) * 1e9))
    report = aggregator_pb2.DownstreamCall(
        method=method, code=code.value[0], message=message, latency=latency
    )
    return Outcome(result, report, error)
