"""Deadline propagation: a downstream call made while serving a call gets the time the incoming call has left.

gRPC does not propagate deadlines by itself in Python. The server side records the incoming deadline in a
ContextVar for the duration of the call (`record`/`forget`, from mesh.server_chain); the client side caps every outgoing call's timeout by it, or by a
default when the incoming call set none, so a chain of calls can never outlive its caller.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from typing import Any

import grpc

# Absolute time.monotonic() by which the call being served must finish; None when it has no deadline.
_incoming_deadline: ContextVar[float | None] = ContextVar("incoming_deadline", default=None)


def remaining(default: float) -> float:
    """Seconds left for an outgoing call: the incoming call's remaining time, capped by `default`."""
    deadline = _incoming_deadline.get()
    if deadline is None:
        return default
    return min(default, max(deadline - time.monotonic(), 0.0))


def record(context: grpc.aio.ServicerContext) -> Token[float | None]:
    """Server side, first inside a call: make the call's deadline the one `remaining` reads."""
    left = context.time_remaining()
    return _incoming_deadline.set(None if left is None else time.monotonic() + left)


def forget(token: Token[float | None]) -> None:
    """Server side, last inside a call: undo `record`."""
    try:
        _incoming_deadline.reset(token)
    except ValueError:
        pass  # ended from outside the call's context (an abandoned stream): that context is gone anyway


class _Capping:
    def __init__(self, default_timeout: float) -> None:
        self._default = default_timeout

    def _capped(self, details: Any, default: float | None = None) -> Any:
        limit = remaining(self._default if default is None else default)
        if limit == float("inf") or (details.timeout is not None and details.timeout <= limit):
            return details
        return details._replace(timeout=limit)


# One class per call kind: grpc.aio files an interceptor under the first kind it is an instance of only.
class _UnaryUnary(_Capping, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._capped(client_call_details), request)


class _UnaryStream(_Capping, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._capped(client_call_details), request)


class _StreamUnary(_Capping, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._capped(client_call_details), requests)


class _StreamStream(_Capping, grpc.aio.StreamStreamClientInterceptor):
    # A bidi stream (a chat, a tour) lives as long as its caller: only the incoming deadline bounds it, and
    # cancellation of the incoming call cancels it.
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(self._capped(client_call_details, float("inf")), requests)


def client_interceptors(default_timeout: float) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors capping every outgoing call by the incoming deadline (or `default_timeout`)."""
    return [kind(default_timeout) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
