"""Logs as Cloud Logging reads them: a line made inside a handler carries the request's trace and span ids, and
secrets (JWTs, PEM private keys, bearer tokens) never reach the output."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mesh import logs, serving
from mesh.testing import NO_REUSEPORT, running
from ping import ping_pb2, ping_pb2_grpc

log = logging.getLogger("logs_test.handler")


def ping(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return ping_pb2_grpc.PingServiceStub(channel)  # type: ignore[return-value]  # generated stubs type as sync


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def configured(stream: io.StringIO, project: str | None = "my-project") -> io.StringIO:
    logs.configure("ping", level="INFO", project=project, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def a_jwt() -> str:
    header = b64url(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"aud": "https://ping", "email": "a@b.iam.gserviceaccount.com"}).encode())
    return f"{header}.{claims}.{b64url(b'signature-bytes-that-matter' * 4)}"


def pem_keys() -> list[str]:
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return [ec_key.decode(), rsa_key.decode()]


class Chatty(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        log.info("handling %s", request.message)
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message))


def chatty(runtime: serving.Runtime) -> Sequence[serving.Service]:
    servicer = Chatty()  # type: ignore[abstract]  # SendUpstream is not needed
    return [serving.Service("ping.PingService", servicer, ping_pb2_grpc.add_PingServiceServicer_to_server)]


@pytest.mark.usefixtures("restore_root_logger")
async def test_a_line_logged_in_a_handler_carries_the_requests_trace() -> None:
    out = configured(io.StringIO())
    spans = InMemorySpanExporter()
    async with running("ping", chatty, exporters=[spans]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=NO_REUSEPORT) as channel:
            await ping(channel).Send(ping_pb2.Request(message="traced"), timeout=5)
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    entries = lines(out)
    (handled,) = [e for e in entries if e["message"] == "handling traced"]
    assert handled["severity"] == "INFO"
    assert (
        handled["logging.googleapis.com/trace"] == f"projects/my-project/traces/{span.context.trace_id:032x}"
    )
    assert handled["logging.googleapis.com/spanId"] == f"{span.context.span_id:016x}"
    # Lines outside any request carry no trace; the start-up line names the port.
    (started,) = [e for e in entries if "serving ping.PingService on port" in e["message"]]
    assert "logging.googleapis.com/trace" not in started


@pytest.mark.usefixtures("restore_root_logger")
def test_jwts_pem_keys_and_bearer_tokens_are_redacted() -> None:
    out = configured(io.StringIO())
    token, keys = a_jwt(), pem_keys()
    log.info("got token %s from the metadata server", token)
    for key in keys:
        log.warning("loaded key %s", key)
        log.warning("key bytes %r", key.encode())  # the repr of bytes, as a library error might show it
    try:
        raise RuntimeError(f"bad header authorization: Bearer {token}")
    except RuntimeError:
        log.exception("verification failed")
    log.info("fields", extra={"json_fields": {"authorization": f"Bearer {token}", "calls": 3}})
    text = out.getvalue()
    assert token.split(".")[2] not in text and token.split(".")[1] not in text
    for key in keys:
        body = key.splitlines()[1]  # a line of the key's base64
        assert body not in text
    entries = lines(out)
    assert all(logs.REDACTED in e["message"] for e in entries[:-1])
    assert entries[-1]["authorization"] == logs.REDACTED and entries[-1]["calls"] == 3
    assert "got token [REDACTED] from the metadata server" == entries[0]["message"]


@pytest.mark.usefixtures("restore_root_logger")
def test_a_terminal_gets_readable_redacted_text() -> None:
    out = configured(Terminal())
    token = a_jwt()
    log.info("token %s", token)
    (line,) = out.getvalue().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "INFO" in line and "ping" in line and "token [REDACTED]" in line
    assert token not in line


def test_ordinary_text_is_left_alone() -> None:
    text = "eyJust a word, a.b.c, BEGIN PUBLIC KEY, bearer short"
    assert logs.redact(text) == text
