"""The one way out: channels to other services, made once and reused for the life of the process.

A channel is TLS with the system roots by default (the authority is the host), a custom CA for local TLS, or
plaintext for local development; it carries a cached ID token for the callee's audience, the tracing and
deadline interceptors, keepalive, and a retry policy for UNAVAILABLE on the methods declared idempotent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import grpc

from mesh.settings import Upstream
from mesh.tokens import IdTokens, audience_for

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Connection-level settings every outgoing channel shares.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 60_000),  # notice dead peers (a scaled-in instance) within about a minute
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
]


def retry_service_config(idempotent: Sequence[str]) -> str:
    """gRPC service config retrying UNAVAILABLE for `idempotent` ("pkg.Service" or "pkg.Service/Method")."""
    names = []
    for name in idempotent:
        service, _, method = name.partition("/")
        names.append({"service": service, "method": method} if method else {"service": service})
    policy = {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]} if names else {})


class Channels:
    """Owner of the process's outgoing channels: one per upstream, closed together at shutdown."""

    def __init__(
        self, id_tokens: IdTokens | None, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
    ) -> None:
        self._id_tokens = id_tokens
        self._interceptors = list(interceptors)
        self._open: dict[tuple[Upstream, tuple[str, ...]], grpc.aio.Channel] = {}

    def open(self, upstream: Upstream, *, idempotent: Sequence[str] = ()) -> grpc.aio.Channel:
        key = (upstream, tuple(idempotent))
        if key not in self._open:
            self._open[key] = self._create(upstream, idempotent)
        return self._open[key]

    def _create(self, upstream: Upstream, idempotent: Sequence[str]) -> grpc.aio.Channel:
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", retry_service_config(idempotent))]
        if upstream.authority:
            options += [("grpc.default_authority", upstream.authority)]
            if not upstream.insecure:
                options += [("grpc.ssl_target_name_override", upstream.authority)]
        if upstream.insecure:
            # Plaintext is for local development only; gRPC refuses call credentials on it, so no token either.
            return grpc.aio.insecure_channel(
                upstream.address, options=options, interceptors=self._interceptors
            )
        roots = upstream.ca_file.read_bytes() if upstream.ca_file else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        if not upstream.unauthenticated:
            if self._id_tokens is None:
                raise ValueError(
                    f"an ID token is needed for {upstream.address}, but this process has no token source"
                )
            audience = upstream.audience or audience_for(upstream.address)
            self._id_tokens.prepare(audience)  # no identity: fail at start-up, not on the first call
            return grpc.aio.secure_channel(
                upstream.address,
                credentials,
                options=options,
                interceptors=[*self._interceptors, *id_token_interceptors(self._id_tokens, audience)],
            )
        return grpc.aio.secure_channel(
            upstream.address, credentials, options=options, interceptors=self._interceptors
        )

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()
        self._open.clear()


class _IdToken:
    """Adds `authorization: Bearer <ID token for audience>` to every call, from the process's cached token.

    Not gRPC call credentials: gRPC runs a metadata plugin on a thread of its own for every RPC, a thread hop
    that cost about a third of a relayed call (BENCHMARKS.md). Here a fresh token is a dict lookup on the
    event loop; a refresh runs in a worker thread. A token that cannot be minted fails the call with
    UNAVAILABLE, as a failing metadata plugin does.
    """

    def __init__(self, id_tokens: IdTokens, audience: str) -> None:
        self._id_tokens = id_tokens
        self._audience = audience

    async def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        # A mint may hang on an unreachable metadata server (google-auth retries for ~15 s): give up while
        # the caller still has time to hear why, instead of letting its deadline pass in silence.
        wait = 0.9 * details.timeout if details.timeout is not None else None
        try:
            token = await self._id_tokens.metadata(self._audience, timeout=wait)
        except asyncio.TimeoutError:
            raise _unavailable(
                f"cannot mint an ID token for {self._audience} within the call's deadline"
            ) from None
        except Exception as exc:  # noqa: BLE001 - google-auth's messages name the endpoint, never a token
            raise _unavailable(
                f"cannot mint an ID token for {self._audience}: {type(exc).__name__}: {exc}"
            ) from None
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *token)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined,no-any-return]


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


# One class per kind of call: grpc.aio files an interceptor under the first kind it implements only.
class _UnaryUnaryIdToken(_IdToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._with_token(client_call_details), request)


class _UnaryStreamIdToken(_IdToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._with_token(client_call_details), request)


class _StreamUnaryIdToken(_IdToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self._with_token(client_call_details), request_iterator)


class _StreamStreamIdToken(_IdToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self._with_token(client_call_details), request_iterator)


def id_token_interceptors(id_tokens: IdTokens, audience: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that attach the ID token for `audience` to every kind of call."""
    kinds = (_UnaryUnaryIdToken, _UnaryStreamIdToken, _StreamUnaryIdToken, _StreamStreamIdToken)
    return [kind(id_tokens, audience) for kind in kinds]
