"""The mesh's one server interceptor: the call's span, its caller's identity and its deadline.

Tracing (mesh.server_spans), ID-token verification (mesh.identity) and deadline recording (mesh.deadlines)
in a single grpc.aio interceptor and a single handler wrapper per method, made once and cached. (Measured
against three separate interceptors: no difference in CPU per call, BENCHMARKS.md item 7; the gain is one
place where the order is decided.) Order inside a call, outermost first: span, identity, deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from mesh import deadlines, handlers, identity
from mesh.identity import EXEMPT_SERVICES, AuthError, TokenVerifier
from mesh.server_spans import UNTRACED_SERVICES, ServerSpans, Start, end_span


@dataclass(frozen=True, slots=True)
class _Method:
    """What a method's calls need, worked out on its first call."""

    handler: grpc.RpcMethodHandler  # the wrapped handler
    authenticated: bool
    before: handlers.Before
    after: handlers.After


def _forget_deadline(token: Any, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
    deadlines.forget(token)


class ServerChain(grpc.aio.ServerInterceptor):
    """Spans (when `provider` is given), token verification (when `verifier` is) and the incoming deadline."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        verifier: TokenVerifier | None = None,
        *,
        exempt_services: Iterable[str] = EXEMPT_SERVICES,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
    ) -> None:
        self._spans = None if provider is None else ServerSpans(provider, untraced_services)
        self._verifier = verifier
        self._exempt = frozenset(exempt_services)
        self._methods: handlers.HandlerCache[_Method] = handlers.HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = self._methods.get(handler_call_details.method, handler, self._method)
        if method.authenticated and self._verifier is not None:
            try:
                await identity.admit(self._verifier, handler_call_details.invocation_metadata)  # type: ignore[arg-type]
            except AuthError as error:
                name = handler_call_details.method
                rejecting = identity.rejecting(name, handler, error)
                return handlers.wrap(rejecting, method.before, method.after, name)
        return method.handler

    def _method(self, name: str, handler: grpc.RpcMethodHandler) -> _Method:
        start = None if self._spans is None else self._spans.starter(name)
        before, after = (deadlines.record, _forget_deadline) if start is None else _traced(start)
        authenticated = self._verifier is not None and not identity.exempt(name, self._exempt)
        return _Method(handlers.wrap(handler, before, after, name), authenticated, before, after)


def _traced(start: Start) -> tuple[handlers.Before, handlers.After]:
    """The span opened around the deadline's record, closed after it is forgotten."""

    def before(context: grpc.aio.ServicerContext) -> Any:
        span, attached = start(context)
        return span, attached, deadlines.record(context)

    def after(token: Any, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        span, attached, deadline = token
        deadlines.forget(deadline)
        end_span(span, attached, context, error)

    return before, after
