"""The mesh's client-side work on every outgoing call: its deadline, its ID token, its trace context and its
metrics.

Deadline capping (mesh.deadlines), the caller's ID token (mesh.tokens), the CLIENT span with the trace
headers (mesh.client_spans) and the call's duration (mesh.metrics), worked out by one `ClientChain` per
channel. A `MeshChannel` sets them on each
call directly: grpc.aio runs a channel's client interceptors in a task of their own on every call (a no-op
interceptor alone cost 13-20 us of client CPU a call, BENCHMARKS.md item 10), so the interceptors
(`ClientChain.interceptors`) serve only a call that must wait for its token to be minted (the first one, or
one after the token expired).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.trace import Span

from mesh import deadlines
from mesh.client_spans import ClientSpans, ended
from mesh.metrics import MethodMetrics, RpcMetrics
from mesh.tokens import IdTokens, Metadata

_UNBOUNDED = float("inf")


@dataclass(slots=True)
class Outgoing:
    """What the chain gives one outgoing call: its timeout and metadata, and what is ended when it is done
    (its recorded span, its metrics since `started`)."""

    timeout: float | None
    metadata: Metadata
    span: Span | None
    measured: MethodMetrics | None
    started: float


class ClientChain:
    """What every call through a channel gets: its timeout capped by the call being served less `margin` (or
    by `default_timeout`; bidi streams by the call being served only), `authorization` with the ID token for
    `audience` (when `id_tokens` is given), and the trace context (with a CLIENT span when sampled)."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        default_timeout: float | None = None,
        margin: float = 0.0,
        id_tokens: IdTokens | None = None,
        audience: str | None = None,
        meters: metrics.MeterProvider | None = None,
    ) -> None:
        if id_tokens is not None and not audience:
            raise ValueError("an ID-token audience is required")
        self._spans = None if provider is None else ClientSpans(provider)
        self._metrics = None if meters is None else RpcMetrics(meters, "client")
        self._default = _UNBOUNDED if default_timeout is None else default_timeout
        self._margin = margin
        self._tokens = id_tokens
        self._audience = audience or ""

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        # One class per call kind: grpc.aio files an interceptor under the first kind it implements only.
        return [kind(self) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]

    def ready(
        self, method: str | bytes, timeout: float | None, metadata: Any, bounded: bool = True
    ) -> Outgoing | None:
        """What a call made now gets, or None while the token is still to be minted."""
        token: Metadata = ()
        if self._tokens is not None:
            cached = self._tokens.cached(self._audience)
            if cached is None:
                return None
            token = cached
        return self._outgoing(method, self._timeout(timeout, bounded), metadata, token)

    async def prepare(self, details: Any, bounded: bool = True) -> tuple[Outgoing, Any]:
        """As `ready`, for an interceptor's call details (returned with the chain's timeout and metadata),
        waiting for the token when it must be minted."""
        started = time.perf_counter()
        timeout = self._timeout(details.timeout, bounded)
        token = () if self._tokens is None else await self._token(timeout)
        outgoing = self._outgoing(details.method, timeout, details.metadata, token, started)
        metadata = grpc.aio.Metadata(*outgoing.metadata)
        return outgoing, details._replace(timeout=outgoing.timeout, metadata=metadata)

    def _outgoing(
        self,
        method: str | bytes,
        timeout: float | None,
        metadata: Any,
        token: Metadata,
        started: float | None = None,
    ) -> Outgoing:
        span, carrier = (None, {}) if self._spans is None else self._spans.start(method)
        measured = None if self._metrics is None else self._metrics.method(method)
        headers = (*(metadata or ()), *token, *carrier.items())
        return Outgoing(timeout, headers, span, measured, time.perf_counter() if started is None else started)

    def _timeout(self, timeout: float | None, bounded: bool) -> float | None:
        limit = deadlines.remaining(self._default if bounded else _UNBOUNDED, self._margin)
        if limit != _UNBOUNDED and (timeout is None or timeout > limit):
            return limit
        return timeout

    async def _token(self, timeout: float | None) -> Metadata:
        assert self._tokens is not None
        cached = self._tokens.cached(self._audience)
        if cached is not None:
            return cached
        # A mint may hang on an unreachable metadata server (google-auth retries for ~15 s): give up while
        # the caller still has time to hear why, instead of letting its deadline pass in silence.
        try:
            return await self._tokens.metadata(self._audience, None if timeout is None else 0.9 * timeout)
        except asyncio.TimeoutError:
            raise _unavailable(
                f"cannot mint an ID token for {self._audience} within the call's deadline"
            ) from None
        except Exception as exc:  # noqa: BLE001 - google-auth's messages name the endpoint, never a token
            raise _unavailable(
                f"cannot mint an ID token for {self._audience}: {type(exc).__name__}: {exc}"
            ) from None


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    """How a call fails when its token cannot be had (as a failing gRPC metadata plugin fails it)."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


class _Interceptor:
    def __init__(self, chain: ClientChain) -> None:
        self._chain = chain

    async def _call(self, continuation: Any, details: Any, request: Any, bounded: bool = True) -> Any:
        outgoing, details = await self._chain.prepare(details, bounded)
        return _ending_with(outgoing, await continuation(details, request))


# One class per call kind, as grpc.aio requires; the request is a message or an iterator of them.
class _UnaryUnary(_Interceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _UnaryStream(_Interceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _StreamUnary(_Interceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await self._call(continuation, client_call_details, requests)


class _StreamStream(_Interceptor, grpc.aio.StreamStreamClientInterceptor):
    # A bidi stream (a chat, a tour) lives as long as its caller: only the incoming deadline bounds it, and
    # cancellation of the incoming call cancels it.
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, requests, bounded=False)


Opener = Callable[[Sequence[grpc.aio.ClientInterceptor]], grpc.aio.Channel]


def _kind(kind: str, bounded: bool = True) -> Callable[..., _Method]:
    """A MeshChannel's `unary_unary` (etc.): the channel's method of that kind, made through the chain."""

    def method(
        channel: MeshChannel,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> _Method:
        how = (request_serializer, response_deserializer, _registered_method)
        return channel._method(kind, method, *how, bounded=bounded)  # noqa: SLF001

    return method


class MeshChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A channel whose calls go out through `chain`: made directly on a channel without interceptors, or,
    while the token is being minted, on a second channel with the chain's interceptors. Both are opened by
    `open` with the same target and arguments, so gRPC gives them the same connection (subchannel)."""

    def __init__(self, open: Opener, chain: ClientChain) -> None:
        self._open = open
        self._chain = chain
        self._direct = open(())
        self._intercepted: grpc.aio.Channel | None = None

    def _waiting(self) -> grpc.aio.Channel:
        if self._intercepted is None:
            self._intercepted = self._open(self._chain.interceptors())
        return self._intercepted

    def _method(self, kind: str, method: str, *how: Any, bounded: bool = True) -> _Method:
        return _Method(
            getattr(self._direct, kind)(method, *how),
            lambda: getattr(self._waiting(), kind)(method, *how),
            method,
            self._chain,
            bounded,
        )

    unary_unary = _kind("unary_unary")
    unary_stream = _kind("unary_stream")
    stream_unary = _kind("stream_unary")
    # A bidi stream (a chat, a tour) lives as long as its caller: only the incoming deadline bounds it.
    stream_stream = _kind("stream_stream", bounded=False)

    async def close(self, grace: float | None = None) -> None:
        await self._direct.close(grace)
        if self._intercepted is not None:
            await self._intercepted.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._direct.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._direct.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._direct.channel_ready()

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


class _Method:
    """One method of a MeshChannel, for every kind of call (a request, or a request iterator, first)."""

    __slots__ = ("_direct", "_waiting", "_method", "_chain", "_bounded")

    def __init__(
        self, direct: Any, waiting: Callable[[], Any], method: str, chain: ClientChain, bounded: bool
    ) -> None:
        self._direct = direct
        self._waiting = waiting
        self._method = method
        self._chain = chain
        self._bounded = bounded

    def __call__(
        self, request: Any = None, *, timeout: float | None = None, metadata: Any = None, **options: Any
    ) -> Any:
        ready = self._chain.ready(self._method, timeout, metadata, self._bounded)
        if ready is None:  # no token at hand: the chain's interceptor waits for the mint
            return self._waiting()(request, timeout=timeout, metadata=metadata, **options)
        call = self._direct(request, timeout=ready.timeout, metadata=ready.metadata, **options)
        return _ending_with(ready, call)


_ending: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references to tasks


def _ending_with(outgoing: Outgoing, call: Any) -> Any:
    """`call`, whose metrics are recorded and CLIENT span (if any) ended with its outcome when it is done."""
    if outgoing.span is not None or outgoing.measured is not None:
        call.add_done_callback(lambda done: _ended(outgoing, done))
    return call


def _ended(outgoing: Outgoing, call: Any) -> None:
    if outgoing.measured is not None:
        code = _code_of_done(call)
        if code is not None:
            outgoing.measured.record(outgoing.started, code)
    if outgoing.span is not None:
        _end_soon(outgoing.span, call)


def _code_of_done(call: Any) -> grpc.StatusCode | None:
    """The status of a done call without a task: its `code()` coroutine returns at once then (the status is
    in hand). None in the unexpected case that it would wait."""
    reading = call.code()
    try:
        reading.send(None)
    except StopIteration as returned:
        return returned.value  # type: ignore[no-any-return]
    reading.close()
    return None


def _end_soon(span: Span, call: Any) -> None:
    # The outcome is read through the call's coroutines, hence a task.
    task = asyncio.ensure_future(ended(span, call))
    _ending.add(task)
    task.add_done_callback(_ending.discard)
