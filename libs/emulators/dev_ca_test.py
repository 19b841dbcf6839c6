"""The development CA: files, modes, idempotence, and a real TLS grpc.aio server and channel."""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography import x509

from emulators.dev_ca import ensure_dev_certs
from mesh.testing import NO_REUSEPORT, loopback
from ping import ping_pb2, ping_pb2_grpc


def sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in names.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    }


def test_creates_ca_and_server_cert_with_private_keys(tmp_path: Path) -> None:
    certs = ensure_dev_certs(tmp_path / "tls")
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert sans(certs.server_cert) >= {"localhost", "127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(certs.server_cert.read_bytes()).verify_directly_issued_by(ca)


def test_is_idempotent_and_extends_names_without_a_new_ca(tmp_path: Path) -> None:
    first = ensure_dev_certs(tmp_path)
    snapshot = {p: p.read_bytes() for p in (first.ca_cert, first.ca_key, first.server_cert, first.server_key)}
    again = ensure_dev_certs(tmp_path)
    assert again == first and all(p.read_bytes() == b for p, b in snapshot.items())
    extended = ensure_dev_certs(tmp_path, ["ping.local", "10.1.2.3"])
    assert extended.ca_cert.read_bytes() == snapshot[first.ca_cert]
    assert extended.server_cert.read_bytes() != snapshot[first.server_cert]
    assert sans(extended.server_cert) >= {"localhost", "127.0.0.1", "::1", "ping.local", "10.1.2.3"}


def test_a_damaged_server_cert_is_replaced(tmp_path: Path) -> None:
    certs = ensure_dev_certs(tmp_path)
    certs.server_cert.write_text("garbage")
    ensure_dev_certs(tmp_path)
    assert "localhost" in sans(certs.server_cert)


class Ping(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=request.message))

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no upstream in this test")
        raise AssertionError("unreachable")


def stub(channel: grpc.aio.Channel) -> ping_pb2_grpc.PingServiceAsyncStub:
    return cast("ping_pb2_grpc.PingServiceAsyncStub", ping_pb2_grpc.PingServiceStub(channel))


@pytest.mark.parametrize("override", [None, "localhost"])
async def test_real_tls_server_and_channel(tmp_path: Path, override: str | None) -> None:
    certs = ensure_dev_certs(tmp_path)
    creds = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())])
    options = NO_REUSEPORT + ([("grpc.ssl_target_name_override", override)] if override else [])
    add = functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, Ping())
    async with loopback(add, credentials=creds) as served:
        trusted = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(served.address, trusted, options=options) as channel:
            reply = await stub(channel).Send(ping_pb2.Request(message="tls"), timeout=10)
            assert reply.pong.message == "tls"
        # A client trusting another CA refuses the server.
        other = ensure_dev_certs(tmp_path / "other")
        stranger = grpc.ssl_channel_credentials(other.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(served.address, stranger, options=options) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(channel).Send(ping_pb2.Request(message="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_runs_as_a_program(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-m", "emulators.dev_ca", str(tmp_path), "--name", "mesh.local"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    assert set(paths) == {"ca_cert", "ca_key", "server_cert", "server_key"}
    assert "mesh.local" in sans(Path(paths["server_cert"]))
