"""The one way out: channels to other services, made once and reused for the life of the process.

A channel is TLS with the system roots by default (the authority is the host), a custom CA for local TLS, or
plaintext for local development; every call on it goes through the client chain (ClientChain: the deadline, a
cached ID token for the callee's audience, the trace context, the metrics), and it has keepalive and a retry
policy for UNAVAILABLE on the methods declared idempotent.

A downstream that hangs is noticed by gRPC's own connection states, not by a breaker of ours: keepalive drops a
connection whose peer stopped answering pings, a connection attempt that gets no HTTP/2 SETTINGS within the
connect timeout fails, and from then on the channel is in TRANSIENT_FAILURE, where calls fail at once with
UNAVAILABLE (pick_first stays there until a reconnection succeeds) instead of waiting out their deadline.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry import metrics, trace

from mesh.client._chain import ClientChain
from mesh.client._tokens import IdTokens, audience_for
from mesh.settings import CONNECT_TO_VARIABLE, CallSettings, Upstream, target_host

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
log = logging.getLogger(__name__)

# Connection-level settings every outgoing channel shares (keepalive and connect timeout: `connection_options`).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    # Retry a lost downstream at least every 10 s (gRPC's default backoff grows to 2 min), so one that was
    # frozen or restarting is found again soon after it answers.
    ("grpc.max_reconnect_backoff_ms", 10_000),
]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def connection_options(calls: CallSettings) -> list[tuple[str, int | str]]:
    """Keepalive and connect timeout of an outgoing channel (what mesh.serving's keepalive policy accepts)."""
    return [
        ("grpc.keepalive_time_ms", _ms(calls.keepalive.time)),
        ("grpc.keepalive_timeout_ms", _ms(calls.keepalive.timeout)),
        # gRPC core waits for any ping's ack this long (1 min by default), keepalive pings included.
        ("grpc.http2.ping_timeout_ms", _ms(calls.keepalive.timeout)),
        # Ping idle connections too: a call made after the peer froze would otherwise be the one to find out.
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging while a long call waits for its reply (gRPC's default stops after 2 pings without data).
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's name for the connect timeout (TCP, TLS and the peer's SETTINGS frame); 20 s by default.
        ("grpc.min_reconnect_backoff_ms", _ms(calls.connect_timeout)),
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
        self,
        id_tokens: IdTokens | None,
        provider: trace.TracerProvider | None = None,
        *,
        calls: CallSettings | None = None,
        meters: metrics.MeterProvider | None = None,
    ) -> None:
        """`calls`: a service's settings for downstream calls; without them (a command-line client, whose
        calls have no incoming deadline) calls are bounded by their own timeouts only."""
        self._id_tokens = id_tokens
        self._provider = provider
        self._calls = calls or CallSettings()
        self._default_timeout = None if calls is None else calls.default_timeout
        self._meters = meters
        self._open: dict[tuple[Upstream, tuple[str, ...]], grpc.aio.Channel] = {}

    def open(self, upstream: Upstream, *, idempotent: Sequence[str] = ()) -> grpc.aio.Channel:
        key = (upstream, tuple(idempotent))
        if key not in self._open:
            self._open[key] = self._create(upstream, idempotent)
        return self._open[key]

    def _create(self, upstream: Upstream, idempotent: Sequence[str]) -> grpc.aio.Channel:
        options = [
            *CHANNEL_OPTIONS,
            *connection_options(self._calls),
            ("grpc.service_config", retry_service_config(idempotent)),
        ]
        # Dialled elsewhere (MESH_CONNECT_TO), an upstream is still named by its address (:authority, TLS name).
        authority = upstream.authority or (upstream.address if upstream.dial else None)
        if authority:
            options += [("grpc.default_authority", authority)]
            if not upstream.insecure:
                name = upstream.authority or target_host(upstream.address)
                options += [("grpc.ssl_target_name_override", name)]
        if upstream.dial:
            log.info("%s is dialled at %s (%s)", upstream.address, upstream.dial, CONNECT_TO_VARIABLE)
        target = upstream.dial or upstream.address
        id_tokens, audience = None, None
        if upstream.insecure:
            # Plaintext is for local development only: a bearer token is never sent in the clear.
            opener: Opener = functools.partial(grpc.aio.insecure_channel, target, options=options)
        else:
            roots = upstream.ca_file.read_bytes() if upstream.ca_file else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            opener = functools.partial(grpc.aio.secure_channel, target, credentials, options=options)
            if not upstream.unauthenticated:
                id_tokens, audience = self._tokens_for(upstream)
        chain = ClientChain(
            self._provider,
            default_timeout=self._default_timeout,
            margin=self._calls.margin,
            meters=self._meters,
            id_tokens=id_tokens,
            audience=audience,
        )
        return MeshChannel(opener, chain)

    def _tokens_for(self, upstream: Upstream) -> tuple[IdTokens, str]:
        if self._id_tokens is None:
            raise ValueError(
                f"an ID token is needed for {upstream.address}, but this process has no token source"
            )
        audience = upstream.audience or audience_for(upstream.address)
        self._id_tokens.prepare(audience)  # no identity: fail at start-up, not on the first call
        return self._id_tokens, audience

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()
        self._open.clear()


# grpc.aio.insecure_channel or secure_channel with all but `interceptors` given.
Opener = Callable[..., grpc.aio.Channel]


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
        return channel._method(kind, method, *how, bounded=bounded)

    return method


class MeshChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A channel whose calls go out through `chain`: made directly on a channel without interceptors, or,
    while the token is being minted, on a second channel with the chain's interceptors. Both are opened by
    `open` with the same target and arguments, so gRPC gives them the same connection (subchannel)."""

    def __init__(self, open: Opener, chain: ClientChain) -> None:
        self._open = open
        self._chain = chain
        self._direct = open(interceptors=())
        self._intercepted: grpc.aio.Channel | None = None

    def _waiting(self) -> grpc.aio.Channel:
        if self._intercepted is None:
            self._intercepted = self._open(interceptors=self._chain.interceptors())
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
        token = self._chain.token()
        if token is None:  # no token at hand: the chain's interceptor waits for the mint
            return self._waiting()(request, timeout=timeout, metadata=metadata, **options)
        outgoing = self._chain.outgoing(self._method, timeout, metadata, token, self._bounded)
        return outgoing.watch(
            self._direct(request, timeout=outgoing.timeout, metadata=outgoing.metadata, **options)
        )
