"""What a call is, for both serving models (mesh.server._asyncio, mesh.server._threads): the four handler
kinds, what `enter` and `after` exchange around the handler, what a call settles before its handler (a
Refusal, or a Pending check that needs a coroutine), and the tolerant request parse.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import grpc

# A call's metadata as gRPC hands it over (grpc.aio and grpc.server alike): keys are text; a "-bin" key's
# value is bytes.
Metadata = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The call ends before its handler, with `code` and `message` (the serving model aborts it)."""

    code: grpc.StatusCode
    message: str


# A client that streams its requests is sent the response headers (these) as soon as its call is admitted, on
# either model, so that it can wait for the verdict before it writes: a message written while the server
# refuses the call can turn the refusal into gRPC core's INTERNAL "Internal error from Core" on the client (a
# grpc.aio race).
ADMITTED: tuple[tuple[str, str], ...] = ()


class Pending(Protocol):
    """An admission check that the call's headers alone could not finish (a token not seen before): `check()`
    is the coroutine to await (the serving model awaits it in the call's task, or runs it on the process's
    event loop for a call on a thread); `settle(checked)` then runs in the call's own context with what
    `check` returned, makes the admission visible to the handler (the caller, the span), and says whether the
    call is refused."""

    def check(self) -> Coroutine[Any, Any, Any]: ...

    def settle(self, checked: Any) -> Refusal | None: ...


class Arrival(Protocol):
    """How long a call may wait for its first request message, and what it must do once it has arrived (an
    exempt call: its request within a second, then a slot of the exempt gate, mesh.server._exempt_gate)."""

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
    the common case, so that case costs no coroutine (nor does a Refusal); `arrival`: what it must do once its
    first request message has arrived, None in the common case."""

    @property
    def pending(self) -> Pending | Refusal | None: ...

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
