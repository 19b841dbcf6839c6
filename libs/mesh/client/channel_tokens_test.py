"""Channels attach the caller's ID token through client interceptors: every kind of call to an authenticated
upstream carries it, one token is minted per audience however many calls run at once, and a token that
cannot be minted fails the call with UNAVAILABLE. The calling side runs in a subprocess (google-auth reads
GCE_METADATA_HOST when imported); the server and the identity emulator run here."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from typing import Any, AsyncIterator

import grpc
import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator
from mesh.client.tokens_test import run_client
from mesh.server import ServerChain, TokenVerifier, current_caller
from mesh.testing import loopback
from routeguide import route_guide_pb2, route_guide_pb2_grpc

ALICE = "alice@proj.iam.gserviceaccount.com"
AUDIENCE = "https://routes.example"

# Through Channels, as a service calls: unary, server stream, client stream, bidi stream.
CLIENT = r"""
import asyncio, json, sys
from pathlib import Path
import grpc
from mesh.client import Channels, IdTokens
from mesh.settings import Upstream
from routeguide import route_guide_pb2 as rg, route_guide_pb2_grpc as rg_grpc

async def main(target, ca_file, audience, calls, pause=""):
    channels = Channels(IdTokens())
    try:
        stub = rg_grpc.RouteGuideStub(channels.open(Upstream(target, audience=audience, ca_file=Path(ca_file))))
        if pause:  # the identity is found; wait while the test takes the metadata server away
            print("opened", flush=True)
            sys.stdin.readline()
        point = rg.Point(latitude=1, longitude=2)
        async def one():
            names = [(await stub.GetFeature(point, timeout=20)).name]
            names += [f.name async for f in stub.ListFeatures(rg.Rectangle(lo=point, hi=point), timeout=20)]
            names.append(str((await stub.RecordRoute(iter([point]), timeout=20)).point_count))
            names += [n.message async for n in stub.RouteChat(iter([rg.RouteNote(location=point)]), timeout=20)]
            return names
        results = await asyncio.gather(*(one() for _ in range(calls)))
        print(json.dumps({"ok": results}))
    except grpc.aio.AioRpcError as err:
        print(json.dumps({"code": err.code().name, "details": err.details()}))
    finally:
        await channels.close()

asyncio.run(main(*sys.argv[1:4], int(sys.argv[4]), *sys.argv[5:]))
"""


class Routes(route_guide_pb2_grpc.RouteGuideServicer):
    """Answers with the verified caller, on every kind of call."""

    def _who(self) -> str:
        caller = current_caller()
        assert caller is not None
        return f"{caller.email}|{caller.audience}"

    async def GetFeature(self, request: Any, context: Any) -> Any:
        return route_guide_pb2.Feature(name=self._who(), location=request)

    async def ListFeatures(self, request: Any, context: Any) -> Any:
        yield route_guide_pb2.Feature(name=self._who())

    async def RecordRoute(self, request_iterator: Any, context: Any) -> Any:
        count = len([p async for p in request_iterator])
        return route_guide_pb2.RouteSummary(point_count=count if self._who() == f"{ALICE}|{AUDIENCE}" else -1)

    async def RouteChat(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            yield route_guide_pb2.RouteNote(message=self._who())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def served(certs: DevCerts) -> AsyncIterator[tuple[IdentityEmulator, str]]:
    with IdentityEmulator() as emulator:
        verifier = TokenVerifier(AUDIENCE, emulator.certs_url)
        credentials = grpc.ssl_server_credentials(
            [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())]
        )
        async with loopback(
            functools.partial(route_guide_pb2_grpc.add_RouteGuideServicer_to_server, Routes()),
            chain=ServerChain(verifier=verifier),
            credentials=credentials,
        ) as served:
            yield emulator, served.address


async def test_every_kind_of_call_carries_one_cached_token(
    certs: DevCerts, served: tuple[IdentityEmulator, str]
) -> None:
    emulator, target = served
    args = ("-c", CLIENT, target, str(certs.ca_cert), AUDIENCE, "30")
    done = await asyncio.to_thread(run_client, emulator.env_for(ALICE), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    who = f"{ALICE}|{AUDIENCE}"
    assert json.loads(done.stdout) == {"ok": [[who, who, "1", who]] * 30}
    assert emulator.identity_requests(ALICE, AUDIENCE) == 1


async def test_a_token_that_cannot_be_minted_fails_the_call_with_unavailable(
    certs: DevCerts, served: tuple[IdentityEmulator, str]
) -> None:
    emulator, target = served
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "GOOGLE_APPLICATION"))}
    env.update(emulator.env_for(ALICE), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        target,
        str(certs.ca_cert),
        AUDIENCE,
        "1",
        "pause",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"opened\n"
        emulator._accounts[ALICE].stop()  # an outage of this one account's metadata server
        child.stdin.write(b"go\n")
        out, err = await asyncio.wait_for(child.communicate(), 60)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0, err.decode()[-3000:]
    answer = json.loads(out)
    assert answer["code"] == "UNAVAILABLE"
    assert answer["details"].startswith(f"cannot mint an ID token for {AUDIENCE}")
    assert emulator.identity_requests(ALICE, AUDIENCE) == 0
