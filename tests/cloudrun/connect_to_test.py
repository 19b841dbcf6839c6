"""MESH_CONNECT_TO: a service's upstream and the CLI name a service by its `run.app` address, as the manifests
do, and reach it through the local front end, keeping that name as :authority (the front end routes by it),
TLS name and ID-token audience (the instance verifies it). The callers run as processes of their own:
google-auth reads the identity emulator's GCE_METADATA_HOST when it is imported."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping

import grpc
import pytest

from cloudrun.frontend import FrontEnd, Target
from emulators.dev_ca import DevCerts
from emulators.identity import IdentityEmulator
from mesh.testing import running
from ping import ping_pb2, ping_pb2_grpc
from services.ping.main import build as build_ping
from tests.cloudrun.instances import CALL_TIMEOUT_S

ALICE = "alice@proj.iam.gserviceaccount.com"
REVISION = "ping-upstream-00001-abc"
SERVING = re.compile(r"serving .* on port (\d+)")
START_WITHIN_S = 30.0


@pytest.fixture
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as emu:
        yield emu


@pytest.fixture
async def upstream(front: FrontEnd, emulator: IdentityEmulator) -> AsyncIterator[str]:
    """ping-upstream's one h2c instance behind the front end, verifying ID tokens for its run.app URL; yields
    that URL's host."""
    host = front.host("ping-upstream")
    env = {
        "K_REVISION": REVISION,
        "AUTH_AUDIENCE": f"https://{host}",
        "AUTH_CERTS_URL": emulator.certs_url,
        "AUTH_ALLOWED_CALLERS": ALICE,
    }
    async with running("ping-upstream", build_ping, env) as instance:
        await asyncio.to_thread(front.set_revision, REVISION, timeout_s=30)
        await asyncio.to_thread(front.set_service, "ping-upstream", [Target(REVISION, 100)])
        await asyncio.to_thread(front.set_endpoints, REVISION, [instance.port])
        yield host


def caller_env(front: FrontEnd, certs: DevCerts, emulator: IdentityEmulator) -> dict[str, str]:
    """Alice's identity, the development CA, and every run.app name dialled at the front end."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "GOOGLE_APPLICATION"))
    }
    return {
        **inherited,
        **emulator.env_for(ALICE),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "TLS_CA_FILE": str(certs.ca_cert),
        "MESH_CONNECT_TO": f".run.app=127.0.0.1:{front.port}",
    }


@pytest.fixture
async def relay(
    front: FrontEnd, certs: DevCerts, emulator: IdentityEmulator, upstream: str
) -> AsyncIterator[int]:
    """The ping service as a process (h2c on loopback) whose upstream is ping-upstream's run.app address, as
    its manifest names it; yields its port once it serves."""
    env: Mapping[str, str] = {
        **caller_env(front, certs, emulator),
        "PORT": "0",
        "BIND_HOST": "127.0.0.1",
        "GRPC_PING_HOST": f"{upstream}:443",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ping.main",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        for _ in range(50):  # JSON log lines (stdout is not a terminal): the port is in the first few
            line = (await asyncio.wait_for(process.stdout.readline(), START_WITHIN_S)).decode()
            assert line, f"the relay exited before serving: {''.join(lines)}"
            lines.append(line)
            if found := SERVING.search(json.loads(line)["message"]):
                break
        else:
            raise AssertionError(f"no 'serving ... on port N' line in {''.join(lines)}")
        yield int(found.group(1))
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


def calls_to(front: FrontEnd, revision: str) -> int:
    return front.stats(rf"^cluster\.{revision}\.upstream_rq_total$").get(
        f"cluster.{revision}.upstream_rq_total", 0
    )


async def test_a_services_upstream_by_its_run_app_name_is_reached_through_the_front_end(
    front: FrontEnd, emulator: IdentityEmulator, upstream: str, relay: int
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
        stub = ping_pb2_grpc.PingServiceStub(channel)
        replies = [
            await stub.SendUpstream(ping_pb2.Request(message=f"hop {n}"), timeout=CALL_TIMEOUT_S)
            for n in range(3)
        ]
    assert [r.pong.message for r in replies] == [f"hop {n} (relayed)" for n in range(3)]
    # Through the front end (which routed them by the run.app :authority), with one token for the run.app
    # audience, which the instance verified.
    assert calls_to(front, REVISION) == 3
    assert emulator.identity_requests(ALICE, f"https://{upstream}") == 1


def run_cli(env: Mapping[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "services.cli.main", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=90, check=False)


async def test_the_cli_reaches_a_run_app_name_through_the_front_end(
    front: FrontEnd, certs: DevCerts, emulator: IdentityEmulator, upstream: str
) -> None:
    env = caller_env(front, certs, emulator)
    flags = ["--server", f"{upstream}:443", "--ca", str(certs.ca_cert), "--json"]
    done = await asyncio.to_thread(run_cli, env, *flags, "ping", "send", "--message", "by name")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["pong"]["message"] == "by name"
    assert calls_to(front, REVISION) == 1
    assert emulator.identity_requests(ALICE, f"https://{upstream}") == 1
