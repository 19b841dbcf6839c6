"""The mesh's client-side work on every outgoing call: its deadline, its ID token, its trace context and its
metrics.

Deadline capping (mesh.deadlines), the caller's ID token (IdTokens), the CLIENT span with the trace headers
(ClientSpans) and the call's duration (mesh.metrics), worked out by one `ClientChain` per channel in one
place, `ClientChain.outgoing`. A MeshChannel (mesh.client._channels) calls it directly on each call while the
token is at hand; a call that must wait for its token to be minted (the first one, or one after the token
expired) goes through the chain's interceptors (`ClientChain.interceptors`), which wait for the mint and then
call the same `outgoing`. Interceptors serve only that call because grpc.aio runs a channel's client
interceptors in a task of their own on every call, a cost paid even by an interceptor that does nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.trace import Span

from mesh import deadlines
from mesh.client._spans import ClientSpans, ended
from mesh.client._tokens import IdTokens, Metadata
from mesh.metrics import MethodMetrics, RpcMetrics

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

    def watch(self, call: Any) -> Any:
        """`call`, whose metrics are recorded and CLIENT span (if any) ended with its outcome when it is done."""
        if self.span is not None or self.measured is not None:
            call.add_done_callback(lambda done: _ended(self, done))
        return call


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
        """The chain as client interceptors, for a call that may wait for its token, or for a plain channel
        (a test's, a command-line client's) that wants the trace context."""
        # One class per call kind: grpc.aio files an interceptor under the first kind it implements only.
        return [kind(self) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]

    def token(self) -> Metadata | None:
        """The call's token metadata at hand (none without id_tokens), or None while it is still to be minted."""
        return () if self._tokens is None else self._tokens.cached(self._audience)

    def outgoing(
        self,
        method: str | bytes,
        timeout: float | None,
        metadata: Any,
        token: Metadata,
        bounded: bool = True,
        started: float | None = None,
    ) -> Outgoing:
        """What a call made now gets, given its token (from `token` or `mint`)."""
        timeout = self._timeout(timeout, bounded)
        span, carrier = (None, {}) if self._spans is None else self._spans.start(method)
        measured = None if self._metrics is None else self._metrics.method(method)
        headers = (*(metadata or ()), *token, *carrier.items())
        return Outgoing(timeout, headers, span, measured, time.perf_counter() if started is None else started)

    def _timeout(self, timeout: float | None, bounded: bool) -> float | None:
        limit = deadlines.remaining(self._default if bounded else _UNBOUNDED, self._margin)
        if limit != _UNBOUNDED and (timeout is None or timeout > limit):
            return limit
        return timeout

    async def mint(self, timeout: float | None, bounded: bool = True) -> Metadata:
        """The token metadata, waiting for its mint within the call's timeout (as `outgoing` caps it);
        UNAVAILABLE if it cannot be had."""
        assert self._tokens is not None
        timeout = self._timeout(timeout, bounded)
        # A mint may hang on an unreachable metadata server (google-auth retries for ~15 s): give up while
        # the caller still has time to hear why, instead of letting its deadline pass in silence.
        try:
            return await self._tokens.metadata(self._audience, None if timeout is None else 0.9 * timeout)
        except asyncio.TimeoutError:
            raise _unavailable(
                f"cannot mint an ID token for {self._audience} within the call's deadline"
            ) from None
        except Exception as exc:  # google-auth's messages name the endpoint, never a token
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
        started, chain = time.perf_counter(), self._chain
        token = chain.token()
        if token is None:  # `outgoing` then caps the timeout again: the mint took some of it
            token = await chain.mint(details.timeout, bounded)
        outgoing = chain.outgoing(details.method, details.timeout, details.metadata, token, bounded, started)
        details = details._replace(timeout=outgoing.timeout, metadata=grpc.aio.Metadata(*outgoing.metadata))
        return outgoing.watch(await continuation(details, request))


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


_ending: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references to tasks


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
