"""What the handler wrappers of both serving models share (mesh.handlers picks the model's wrapper): the
four handler kinds, the per-call types `enter` and `after` exchange, what a call settles before its handler
(Pending, Refusal), and the tolerant request parse.

The models: grpc.aio (mesh.aio_handlers: the handler is a coroutine or an async generator, every call its own
task) and threads (mesh.thread_handlers: grpc.server; the handler is a function or a generator, every call on
a thread of the server's pool, in a fresh contextvars.Context, as a task would be).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc

from mesh.quick_pool import QuickPool

Result = TypeVar("Result")


@dataclass(frozen=True)
class Threads:
    """The threads serving model: calls run on grpc.server's pool; what must be awaited on their behalf (a new
    token's verification, a downstream call on the process's channels) runs on `loop`, the process's event
    loop, so one client chain serves both models. The methods marked `never_waits` run on `quick`, a pool of a
    few threads, when one is given (BENCHMARKS.md, "Serving model": a call handed to one of many idle threads
    costs more CPU than one taken from the queue by a busy thread; mesh.quick_pool: a call waiting for its
    request does not hold one of them)."""

    loop: asyncio.AbstractEventLoop
    quick: QuickPool | None = None

    def run(self, coroutine: Coroutine[Any, Any, Result], context: grpc.ServicerContext) -> Result:
        """`coroutine`'s result, awaited on the loop in a copy of the calling thread's context (the call's
        deadline, span and caller: asyncio copies it), and cancelled when the call ends first (the client
        went away, or its deadline passed)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        if not context.add_callback(future.cancel):
            future.cancel()  # the call has already ended
        return future.result()


Method = TypeVar("Method", bound=Callable[..., Any])
_NEVER_WAITS = "mesh_never_waits"


def never_waits(method: Method) -> Method:
    """Marks a servicer method of the threads model that answers from its request and CPU alone (no downstream
    call, no lock held for long, no stream): the server runs it on its few quick threads (Threads.quick)."""
    setattr(method, _NEVER_WAITS, True)
    return method


def waits(behavior: Callable[..., Any]) -> bool:
    """Whether a handler's behavior may wait (anything not marked `never_waits`)."""
    return not getattr(behavior, _NEVER_WAITS, False)


class Pending(Protocol):
    """What a call must settle before its handler runs (its caller's verification, or its refusal), on either
    model: awaited in the call's task (`wait`), or from the call's thread (`block`)."""

    async def wait(self, context: grpc.aio.ServicerContext) -> None: ...

    def block(self, context: grpc.ServicerContext, threads: Threads) -> None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """The call ends before its handler, with `code` and `message`."""

    code: grpc.StatusCode
    message: str

    async def wait(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(self.code, self.message)

    def block(self, context: grpc.ServicerContext, threads: Threads) -> None:
        context.abort(self.code, self.message)


class Arrival(Protocol):
    """How long a call may wait for its first request message, and what it must do once it has arrived (an
    exempt call: its request within a second, then a slot of the exempt gate, mesh.server_chain)."""

    @property
    def seconds(self) -> float: ...

    def waiting(self, end: Callable[[], None]) -> None:
        """The call waits for its request from now; `end()` (callable from any thread) ends the wait early."""
        ...

    def waited(self) -> None:
        """The wait is over, however it ended: `end` is no longer called."""
        ...

    def arrived(self) -> Refusal | None:
        """The request has arrived: None when the call may go on, else its refusal."""
        ...


class Entered(Protocol):
    """What `enter` leaves for `after`; `pending`: what the call must settle before its handler runs, None in
    the common case, so that case costs no coroutine; `arrival`: what it must do once its first request message
    has arrived, None in the common case."""

    @property
    def pending(self) -> Pending | None: ...

    @property
    def arrival(self) -> Arrival | None: ...


class Messages:
    """The messages a streaming call has received and sent so far (counted by the wrapper)."""

    __slots__ = ("received", "sent")

    def __init__(self, received: int = 0) -> None:
        self.received = received
        self.sent = 0


# Runs first inside every call, with the call's context (grpc.aio's or grpc's ServicerContext).
Enter = Callable[[Any], Entered]
# Runs last inside every call: what `enter` returned, the call's context, what the handler raised (None if
# nothing), and the messages of a streaming call (None for a unary one).
After = Callable[[Any, Any, BaseException | None, Messages | None], None]


def one_answered(
    after: After, entered: Entered, context: Any, error: BaseException | None, messages: Messages | None
) -> None:
    """The end of a call with one response: a client stream's count of it (`messages`; None for a unary call,
    whose messages are not counted), then `after`."""
    if messages is not None and error is None:
        messages.sent = 1
    after(entered, context, error, messages)


class Kind(NamedTuple):
    behavior: str  # the RpcMethodHandler attribute that holds the servicer's method
    factory: Callable[..., grpc.RpcMethodHandler]  # what makes a handler of this kind


# The four kinds of handler, by (request streaming, response streaming).
KINDS = {
    (False, False): Kind("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): Kind("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): Kind("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): Kind("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def kind_of(handler: grpc.RpcMethodHandler) -> Kind:
    return KINDS[bool(handler.request_streaming), bool(handler.response_streaming)]


UNDECODABLE = object()  # what a request that does not parse deserializes to


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure is the client's: refused in the handler
            return UNDECODABLE

    return deserialize


def not_a_message(method: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {method}")


def no_request(method: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"no request message for {method}")


def late_request(arrival: Arrival) -> Refusal:
    return Refusal(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the request message did not arrive within {arrival.seconds:g} s of the call's headers (or before newer"
        " calls waiting for theirs)",
    )
