"""IdTokens through google-auth's real metadata-server path, against the identity emulator.

google-auth reads GCE_METADATA_HOST when it is imported, so the calling side runs in a subprocess whose
environment points at one emulated account's metadata server; the servers and the emulator run here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import grpc
import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator
from mesh.client import audience_for
from mesh.server import ServerChain, TokenVerifier, current_caller
from mesh.testing import start_loopback
from ping import ping_pb2, ping_pb2_grpc

ALICE = "alice@proj.iam.gserviceaccount.com"
BOB = "bob@proj.iam.gserviceaccount.com"

# The calling service: one IdTokens behind Channels (the path a service's calls take), N concurrent calls per
# target in batches of 20; a "pause" step sleeps `calls` seconds.
CLIENT = r"""
import asyncio, json, sys
from pathlib import Path
from mesh.client import Channels, IdTokens
from mesh.settings import Upstream
from ping import ping_pb2, ping_pb2_grpc

async def main(ca_file, plan):
    channels = Channels(IdTokens())
    seen = {}
    for target, audience, calls in plan:
        if target is None:
            await asyncio.sleep(calls)
            continue
        upstream = Upstream(target, audience=audience, ca_file=Path(ca_file))
        stub = ping_pb2_grpc.PingServiceStub(channels.open(upstream))
        for batch in range(calls // 20):
            sent = (stub.Send(ping_pb2.Request(message="hi"), timeout=20) for _ in range(20))
            for r in await asyncio.gather(*sent):
                seen[r.pong.message] = seen.get(r.pong.message, 0) + 1
    await channels.close()
    print(json.dumps(seen))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


class Ping(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        caller = current_caller()
        assert caller is not None
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=f"{caller.email}|{caller.audience}"))

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no upstream in this test")
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as emu:
        yield emu


async def tls_server(certs: DevCerts, verifier: TokenVerifier) -> tuple[grpc.aio.Server, str]:
    creds = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())])
    served = await start_loopback(
        functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, Ping()),
        chain=ServerChain(verifier=verifier),
        credentials=creds,
    )
    return served.server, served.address


# Run off the event loop: the servers under test answer on it meanwhile.
def run_client(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "GOOGLE_APPLICATION"))
    }
    full_env.update(env, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, *args], env=full_env, capture_output=True, text=True, timeout=90, check=False
    )


@pytest.fixture
async def two_services(certs: DevCerts, emulator: IdentityEmulator) -> AsyncIterator[list[str]]:
    servers = []
    targets = []
    for audience in ("https://a.example", "https://b.example"):
        server, target = await tls_server(certs, TokenVerifier(audience, emulator.certs_url))
        servers.append(server)
        targets.append(target)
    yield targets
    for server in servers:
        await server.stop(None)


async def calls_as(account: str, emulator: IdentityEmulator, certs: DevCerts, plan: list[Any]) -> Any:
    """The answers (caller|audience: count) to `plan`'s calls, made by the calling service as `account`."""
    args = ("-c", CLIENT, str(certs.ca_cert), json.dumps(plan))
    done = await asyncio.to_thread(run_client, emulator.env_for(account), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


async def test_one_mint_per_audience_across_many_calls(
    certs: DevCerts, emulator: IdentityEmulator, two_services: list[str]
) -> None:
    plan = [
        [two_services[0], "https://a.example", 200],
        [two_services[1], "https://b.example", 60],
        [two_services[0], "https://a.example", 40],
        [two_services[1], "https://b.example", 20],
    ]
    assert await calls_as(ALICE, emulator, certs, plan) == {
        f"{ALICE}|https://a.example": 240,
        f"{ALICE}|https://b.example": 80,
    }
    assert emulator.identity_requests(ALICE, "https://a.example") == 1
    assert emulator.identity_requests(ALICE, "https://b.example") == 1
    assert emulator.identity_requests() == 2


async def test_token_is_refreshed_once_when_google_auth_deems_it_stale(
    certs: DevCerts, emulator: IdentityEmulator, two_services: list[str]
) -> None:
    # google-auth refreshes 225 s before expiry: a 227 s token turns stale after about 2 s.
    emulator.token_lifetime_s = 227
    a, b = two_services
    plan = [
        [a, "https://a.example", 40],
        [b, "https://b.example", 40],
        [None, None, 3],
        [a, "https://a.example", 40],
        [b, "https://b.example", 40],
    ]
    assert await calls_as(ALICE, emulator, certs, plan) == {
        f"{ALICE}|https://a.example": 80,
        f"{ALICE}|https://b.example": 80,
    }
    assert emulator.identity_requests(ALICE, "https://a.example") == 2
    assert emulator.identity_requests(ALICE, "https://b.example") == 2


async def test_each_account_has_its_own_metadata_server(
    certs: DevCerts, emulator: IdentityEmulator, two_services: list[str]
) -> None:
    plan = [[two_services[0], "https://a.example", 20]]
    for account in (ALICE, BOB):
        assert await calls_as(account, emulator, certs, plan) == {f"{account}|https://a.example": 20}
        assert emulator.identity_requests(account) == 1
    assert emulator.env_for(ALICE) != emulator.env_for(BOB)


def test_no_identity_gives_a_clear_error_without_secrets(tmp_path: Path) -> None:
    # A loopback port with nothing listening stands in for "no metadata server" (never 169.254.169.254).
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    # At start-up, as a service opens its channels: the identity is looked for before any call.
    code = (
        "from mesh.client import Channels, IdTokens\nfrom mesh.settings import Upstream\n"
        "Channels(IdTokens()).open(Upstream('a.example:443'))\n"
    )
    env = {"GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "GCE_METADATA_DETECT_RETRIES": "1"}
    done = run_client(env, "-c", code)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mesh.client._tokens.NoCredentialsError: no identity to mint ID tokens with")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in last


@pytest.mark.parametrize(
    "target,audience",
    [
        ("ping-abc-uc.a.run.app:443", "https://ping-abc-uc.a.run.app"),
        ("localhost:50051", "https://localhost"),
        ("127.0.0.1:8080", "https://127.0.0.1"),
        ("[::1]:443", "https://[::1]"),
        ("::1", "https://[::1]"),
        ("example.com", "https://example.com"),
        ("dns:///svc.internal:443", "https://svc.internal"),
    ],
)
def test_audience_is_https_host_without_port(target: str, audience: str) -> None:
    assert audience_for(target) == audience


def test_audience_needs_a_host() -> None:
    with pytest.raises(ValueError):
        audience_for(":443")
