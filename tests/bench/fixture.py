"""What the servers under test need around them: the development CA, the identity emulator (tokens, certs,
mint counts), a span sink, and each server's environment as production configures it."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import grpc

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator, Names
from services.routeguide.features import generated_database, write_database
from tests.bench.processes import python_path
from tests.bench.span_sink import SpanSink

PROJECT = "bench"
NAMES = Names(PROJECT, "bench.local")
CLIENT = NAMES.account("bench-client")
# Production's sampler: parent-based, with a ratio for calls that arrive without a trace context.
SAMPLER = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
# What Cloud Run's front end adds to a request it does not sample (nearly all: it samples about 0.1 request/s
# per instance): the parent-based sampler follows it, so the ratio above never applies to such calls.
_TRACE, _SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CLOUD_RUN_UNSAMPLED = (
    ("traceparent", f"00-{_TRACE}-{_SPAN}-00"),
    ("x-cloud-trace-context", f"{_TRACE}/{int(_SPAN, 16)};o=0"),
)
_SCRUBBED = (
    "PEX",
    "OTEL_",
    "GRPC_",
    "AUTH_",
    "TLS_",
    "GCE_",
    "GOOGLE_",
    "K_",
    "PING_",
    "ROUTEGUIDE_",
    "UPSTREAM_",
)


account = NAMES.account
audience = NAMES.audience


class Fixture:
    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-")
        self.dir = Path(self._dir.name)
        # The benchmark's routeguide serves the generated 500 features (chosen here: ListFeatures needs size).
        self.features_file = self.dir / "features.json"
        self.certs: DevCerts = ensure_dev_certs(self.dir / "certs")
        self.identity = IdentityEmulator(project_id=PROJECT)
        self.sink = SpanSink()

    async def start(self) -> None:
        write_database(generated_database(), str(self.features_file))
        self.identity.start()
        self.identity.add_account(CLIENT)
        await self.sink.start()

    async def stop(self) -> None:
        await self.sink.stop()
        self.identity.stop()
        self._dir.cleanup()

    def token(self, service: str) -> str:
        """An ID token of the bench client for `service` (valid an hour: longer than any run)."""
        return self.identity.mint(CLIENT, audience(service))

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        return {
            **env,
            "PYTHONPATH": python_path(),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
            "ROUTEGUIDE_DB": str(self.features_file),
        }  # the "serving" line is INFO

    def featured_env(self, service: str, callers: tuple[str, ...] = ()) -> dict[str, str]:
        """TLS, ID-token verification with an allow-list, tracing exported over OTLP: the production set-up."""
        return {
            **self.base_env(),
            **self.identity.env_for(account(service)),
            "K_SERVICE": service,
            "TLS_CERT_FILE": str(self.certs.server_cert),
            "TLS_KEY_FILE": str(self.certs.server_key),
            "TLS_CA_FILE": str(self.certs.ca_cert),
            "AUTH_AUDIENCE": audience(service),
            "AUTH_CERTS_URL": self.identity.certs_url,
            "AUTH_ALLOWED_CALLERS": ",".join([CLIENT, *(account(c) for c in callers)]),
            "OTEL_SERVICE_NAME": service,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.sink.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_PROPAGATORS": "tracecontext,gcp_trace",
            **SAMPLER,
        }

    def h2c(self, env: dict[str, str]) -> dict[str, str]:
        """The same without TLS: how Cloud Run's front end talks to the container (TLS ends before it)."""
        return {k: v for k, v in env.items() if k not in ("TLS_CERT_FILE", "TLS_KEY_FILE")}

    def channel(self, port: int, tls: bool) -> grpc.aio.Channel:
        options = [("grpc.so_reuseport", 0)]
        if not tls:
            return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        credentials = grpc.ssl_channel_credentials(self.certs.ca_cert.read_bytes())
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def service_argv(module: str) -> list[str]:
    return [sys.executable, "-m", module]
