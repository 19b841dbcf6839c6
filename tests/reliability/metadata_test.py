"""The identity emulator (the metadata server) down, seen from a real ping process relaying to ping-upstream over
TLS with ID tokens: a cached token keeps working while it is fresh; once a new token is needed, the relayed call
fails with a clear UNAVAILABLE that carries no token; and it recovers when the metadata server is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from emulators.dev_ca import DevCerts
from emulators.identity import IdentityEmulator
from ping import ping_pb2
from tests.reliability import calls
from tests.reliability.processes import Service
from tests.reliability.stack import account, audience, secure_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

# google-auth refreshes an ID token 3 min 45 s (225 s) before it expires: a lifetime of 228 s leaves a token
# fresh for 3 s, then stale (refreshed before use) though still valid for 225 s.
REFRESH_MARGIN_S = 225
FRESH_S = 3
# A token that expires a moment after it is minted: the next call after that needs a new one.
EXPIRING_S = 2


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def upstream(emulator: IdentityEmulator, certs: DevCerts) -> AsyncIterator[Service]:
    service = await Service(
        "ping-upstream", secure_env("ping-upstream", emulator, certs, ("ping",)), kind="ping"
    ).start()
    yield service
    assert await service.stop() == 0


@pytest_asyncio.fixture(loop_scope="module")
async def relay(emulator: IdentityEmulator, certs: DevCerts, upstream: Service) -> AsyncIterator[Service]:
    """A fresh ping process (so no token cached yet), plaintext to its clients, TLS + ID token to its upstream."""
    emulator.start()
    env = {
        "TLS_CA_FILE": str(certs.ca_cert),
        "GRPC_PING_HOST": f"localhost:{upstream.port}",
        "GRPC_PING_HOST_AUDIENCE": audience("ping-upstream"),
        **emulator.env_for(account("ping")),
    }
    service = await Service("ping", env).start()
    yield service
    emulator.start()
    assert await service.stop() == 0


def relay_upstream(relay: Service) -> str:
    return relay.env["GRPC_PING_HOST"].rpartition(":")[2]


async def relayed(service: Service, timeout: float = 10) -> str:
    """A relayed ping: "OK", or the failure's code and message."""
    async with calls.insecure(service.address) as channel:
        try:
            reply = await calls.ping(channel).SendUpstream(ping_pb2.Request(message="m"), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
    assert reply.pong.message == "m (relayed)"
    return "OK"


async def test_a_cached_token_keeps_working_while_the_metadata_server_is_down(
    emulator: IdentityEmulator, relay: Service
) -> None:
    emulator.token_lifetime_s = 3600
    assert await relayed(relay) == "OK"  # the one mint
    minted = emulator.identity_requests(account("ping"))
    emulator.stop()
    assert [await relayed(relay) for _ in range(20)] == ["OK"] * 20
    emulator.start()
    assert emulator.identity_requests(account("ping")) == minted


async def test_when_a_new_token_is_needed_the_call_fails_clearly_then_recovers(
    emulator: IdentityEmulator, relay: Service
) -> None:
    emulator.token_lifetime_s = EXPIRING_S
    assert await relayed(relay) == "OK"
    emulator.stop()
    await asyncio.sleep(EXPIRING_S + 0.5)  # the cached token has expired: a new one is needed
    # google-auth tries the metadata server 5 times with exponential backoff (about 15 s) before it gives up.
    failure = await relayed(relay, timeout=40)
    # The caller learns who failed and how; why (the metadata server's address and answer) is in the log only.
    assert failure == f"UNAVAILABLE: upstream localhost:{relay_upstream(relay)}: UNAVAILABLE", failure
    assert any(f"cannot mint an ID token for {audience('ping-upstream')}" in m for m in relay.messages())
    emulator.start()
    outcomes = []
    for _ in range(20):  # bounded: google-auth retries the metadata server with backoff
        outcomes.append(await relayed(relay))
        if outcomes[-1] == "OK":
            break
        await asyncio.sleep(0.25)
    assert outcomes[-1] == "OK", outcomes
    assert not any("eyJ" in line for line in relay.lines)


async def test_a_stale_but_unexpired_token_keeps_working_while_the_metadata_server_is_down(
    emulator: IdentityEmulator, relay: Service
) -> None:
    emulator.token_lifetime_s = REFRESH_MARGIN_S + FRESH_S
    assert await relayed(relay) == "OK"
    emulator.stop()
    await asyncio.sleep(FRESH_S + 0.5)  # stale now, valid for another ~224 s
    assert await relayed(relay, timeout=3) == "OK"


async def test_a_call_that_needs_a_token_fails_clearly_within_its_deadline(
    emulator: IdentityEmulator, relay: Service
) -> None:
    emulator.token_lifetime_s = EXPIRING_S
    assert await relayed(relay) == "OK"
    emulator.stop()
    await asyncio.sleep(EXPIRING_S + 0.5)
    failure = await relayed(relay, timeout=3)
    assert failure == f"UNAVAILABLE: upstream localhost:{relay_upstream(relay)}: UNAVAILABLE", failure
    assert any("cannot mint an ID token" in m and "within the call's deadline" in m for m in relay.messages())
