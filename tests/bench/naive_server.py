"""The naive full-featured baseline: what a team builds from gRPC's sync example and the usual libraries.

A sync grpc.server with a thread pool, TLS, an ID-token check with google-auth (RS256, certs from
AUTH_CERTS_URL, each verified token cached until it expires) and an allow-list of caller emails, and
opentelemetry-instrumentation-grpc's server interceptor on the SDK's TracerProvider (sampler and propagators
from OTEL_*, spans batched to OTLP). It reads the variables the bench's fixture sets for the real service.
`python -m tests.bench.naive_server 4|256` (thread-pool workers) prints {"event": "serving", "port": N}.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import google.auth.transport.requests
import grpc
from google.oauth2 import id_token
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tests.bench.raw_server import run_sync, sync_server


class TokenCheck(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every call needs `authorization: Bearer <Google ID token>` for our audience from an allowed email."""

    def __init__(self, audience: str, certs_url: str, allowed: set[str]) -> None:
        self._audience, self._certs_url, self._allowed = audience, certs_url, allowed
        self._request = google.auth.transport.requests.Request()
        self._verified: dict[str, Mapping[str, Any]] = {}  # token -> claims, until "exp"
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        header = dict(details.invocation_metadata).get("authorization", "")
        if not header.startswith("Bearer "):
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            claims = self._claims(header[len("Bearer ") :])
        except ValueError as err:  # google-auth raises ValueError subclasses for bad tokens
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {type(err).__name__}")
        if claims.get("email") not in self._allowed or not claims.get("email_verified"):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, "caller not allowed")
        return continuation(details)

    def _claims(self, token: str) -> Mapping[str, Any]:
        with self._lock:
            claims = self._verified.get(token)
        if claims is None or claims["exp"] <= time.time():
            claims = id_token.verify_token(
                token, self._request, audience=self._audience, certs_url=self._certs_url
            )
            with self._lock:
                if len(self._verified) > 10_000:  # bounded: forget everything rather than grow
                    self._verified.clear()
                self._verified[token] = claims
        return claims


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def tracer_provider() -> TracerProvider:
    """The SDK reads OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG] and OTEL_EXPORTER_OTLP_*; OTEL_PROPAGATORS
    is read by opentelemetry.propagate itself."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def main(workers: int) -> None:
    env = os.environ
    check = TokenCheck(
        env["AUTH_AUDIENCE"], env["AUTH_CERTS_URL"], set(env["AUTH_ALLOWED_CALLERS"].split(","))
    )
    provider = tracer_provider()
    server = sync_server(workers, [server_interceptor(tracer_provider=provider), check])
    credentials = grpc.ssl_server_credentials(
        [(Path(env["TLS_KEY_FILE"]).read_bytes(), Path(env["TLS_CERT_FILE"]).read_bytes())]
    )
    run_sync(server, server.add_secure_port(f"127.0.0.1:{env.get('PORT', '0')}", credentials))
    provider.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: naive_server WORKERS (thread-pool size, e.g. 4 or 256)")
    main(int(sys.argv[1]))
