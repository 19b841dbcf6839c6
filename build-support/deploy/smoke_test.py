"""The canary's smoke test against the real local mesh (processes, TLS, ID tokens): every service passes;
a routeguide started on the wrong database and a ping started with the wrong audience fail, naming the check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from deploy import smoke
from localmesh import topology
from localmesh.launcher import Mesh
from localmesh.processes import ServiceProcess, python_module
from services.routeguide.features import generated_database, write_database

KIND = {"ping": "ping", "ping-upstream": "ping", "routeguide": "routeguide", "aggregator": "aggregator"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path_factory.mktemp("mesh")) as running:
        yield running


def target(mesh: Mesh, name: str, port: int, audience: str | None = None) -> smoke.Target:
    assert mesh.certs is not None
    token = mesh.identity.mint(topology.DEVELOPER, audience or topology.audience(name))
    url = f"https://localhost:{port}"
    return smoke.Target(KIND[name], url, token, relay=name == "ping", ca_file=mesh.certs.ca_cert)


async def broken(mesh: Mesh, name: str, **settings: str) -> ServiceProcess:
    """Another instance of a mesh service, started with settings that break it (it still serves)."""
    spec = topology.BY_NAME[name]
    process = ServiceProcess(f"broken-{name}", python_module(spec.module), {**mesh.env_for(spec), **settings})
    await process.start()
    return process


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", ["ping-upstream", "routeguide", "ping", "aggregator"])
async def test_every_service_of_the_mesh_passes(mesh: Mesh, name: str) -> None:
    await asyncio.to_thread(smoke.check, target(mesh, name, mesh.endpoints[name].port))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_routeguide_on_the_wrong_database_fails_its_call(mesh: Mesh, tmp_path: Path) -> None:
    database = tmp_path / "features.json"
    write_database(generated_database(count=5), str(database))
    process = await broken(mesh, "routeguide", ROUTEGUIDE_DB=str(database))
    try:
        with pytest.raises(
            smoke.SmokeFailed, match=r"^routeguide.GetFeature: the first canonical place is named ''"
        ):
            await asyncio.to_thread(smoke.check, target(mesh, "routeguide", process.port))
    finally:
        await process.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_ping_verifying_the_wrong_audience_fails_its_call(mesh: Mesh) -> None:
    process = await broken(mesh, "ping", AUTH_AUDIENCE="https://elsewhere.mesh.local")
    try:
        with pytest.raises(smoke.SmokeFailed, match=r"^ping.SendUpstream: UNAUTHENTICATED"):
            await asyncio.to_thread(smoke.check, target(mesh, "ping", process.port))
    finally:
        await process.stop()


def test_a_url_that_is_not_https_is_refused() -> None:
    with pytest.raises(smoke.SmokeFailed, match="is not an https URL"):
        smoke.check(smoke.Target("ping", "http://localhost:1", "token"))
