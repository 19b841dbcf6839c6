"""The one way out: channels to other services, made once and reused for the life of the process.

A channel is TLS with the system roots by default (the authority is the host), a custom CA for local TLS, or
plaintext for local development; every call on it goes through the client chain (mesh.client_chain: the
deadline, a cached ID token for the callee's audience, the trace context, the metrics), and it has keepalive
and a retry policy for UNAVAILABLE on the methods declared idempotent.

A downstream that hangs is noticed by gRPC's own connection states, not by a breaker of ours: keepalive drops a
connection whose peer stopped answering pings, a connection attempt that gets no HTTP/2 SETTINGS within the
connect timeout fails, and from then on the channel is in TRANSIENT_FAILURE, where calls fail at once with
UNAVAILABLE (pick_first stays there until a reconnection succeeds) instead of waiting out their deadline.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence

import grpc
from opentelemetry import metrics, trace

from mesh.client_chain import ClientChain, MeshChannel
from mesh.settings import CONNECT_TO_VARIABLE, CallSettings, Upstream, target_host
from mesh.tokens import IdTokens, audience_for

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
        chain_of = functools.partial(
            ClientChain,
            self._provider,
            default_timeout=self._default_timeout,
            margin=self._calls.margin,
            meters=self._meters,
        )
        chain = chain_of()
        if upstream.insecure:
            # Plaintext is for local development only: a bearer token is never sent in the clear.
            return MeshChannel(
                lambda interceptors: grpc.aio.insecure_channel(
                    target, options=options, interceptors=interceptors
                ),
                chain,
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
            chain = chain_of(id_tokens=self._id_tokens, audience=audience)
        return MeshChannel(
            lambda interceptors: grpc.aio.secure_channel(
                target, credentials, options=options, interceptors=interceptors
            ),
            chain,
        )

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()
        self._open.clear()
