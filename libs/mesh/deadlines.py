"""Deadline propagation: a downstream call made while serving a call gets the time the incoming call has left.

gRPC does not propagate deadlines by itself in Python. The server side records the incoming deadline in a
ContextVar for the duration of the call (`record`/`forget`, from mesh.server._chain); the client side
(mesh.client's ClientChain) caps every outgoing call's timeout by it, less a margin for answering, or by a
default when the incoming call set none, so a chain of calls can never outlive its caller, and each hop has
time to say which downstream failed it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

import grpc

# Absolute time.monotonic() by which the call being served must finish; None when it has no deadline.
_incoming_deadline: ContextVar[float | None] = ContextVar("incoming_deadline", default=None)


def remaining(default: float, margin: float = 0.0) -> float:
    """Seconds left for an outgoing call: the incoming call's remaining time less `margin`, capped by `default`.

    The margin is the time the service keeps to answer with what it has when a downstream call runs out (a
    partial answer, or a status that names the downstream), instead of its caller's deadline passing first.
    It is never more than half of what is left, so a short deadline still leaves the downstream call time.
    """
    deadline = _incoming_deadline.get()
    if deadline is None:
        return default
    left = max(deadline - time.monotonic(), 0.0)
    return min(default, left - min(margin, left / 2))


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
