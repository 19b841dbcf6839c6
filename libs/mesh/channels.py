"""The one way out: channels to other services, made once and reused for the life of the process.

A channel is TLS with the system roots by default (the authority is the host), a custom CA for local TLS, or
plaintext for local development; it carries a cached ID token for the callee's audience, the tracing and
deadline interceptors, keepalive, and a retry policy for UNAVAILABLE on the methods declared idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from opentelemetry import metrics, trace

from mesh.client_chain import ClientChain, MeshChannel
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
        self,
        id_tokens: IdTokens | None,
        provider: trace.TracerProvider | None = None,
        *,
        default_timeout: float | None = None,
        meters: metrics.MeterProvider | None = None,
    ) -> None:
        self._id_tokens = id_tokens
        self._provider = provider
        self._default_timeout = default_timeout
        self._meters = meters
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
        chain = ClientChain(self._provider, default_timeout=self._default_timeout, meters=self._meters)
        if upstream.insecure:
            # Plaintext is for local development only: a bearer token is never sent in the clear.
            return MeshChannel(
                lambda interceptors: grpc.aio.insecure_channel(
                    upstream.address, options=options, interceptors=interceptors
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
            chain = ClientChain(
                self._provider,
                default_timeout=self._default_timeout,
                id_tokens=self._id_tokens,
                audience=audience,
                meters=self._meters,
            )
        return MeshChannel(
            lambda interceptors: grpc.aio.secure_channel(
                upstream.address, credentials, options=options, interceptors=interceptors
            ),
            chain,
        )

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()
        self._open.clear()
