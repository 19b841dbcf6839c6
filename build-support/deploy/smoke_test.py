"""The canary's smoke test against the real local mesh (the local Cloud Run: front end, TLS, ID tokens): every
service passes by its run.app URL; a tagged routeguide revision on the wrong database and a tagged ping
revision verifying the wrong audience fail by their tag's URL, naming the check, as the canary meets them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from deploy import smoke
from localmesh.launcher import Mesh
from services.routeguide.features import generated_database, write_database


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path_factory.mktemp("mesh")) as running:
        yield running


def target(mesh: Mesh, name: str, url: str | None = None) -> smoke.Target:
    """As the canary calls: the service's (or a tag's) URL, a token of one of its callers (the developer when
    services/invokers.yaml lets outside callers in), the front end as the address of every run.app name."""
    assert mesh.plan is not None
    callers = mesh.plan.invokers(name)
    caller = mesh.developer if mesh.developer in callers else callers[0]
    return smoke.Target(
        mesh.plan[name].folder,
        url or f"https://{mesh.host(name)}",
        mesh.identity.mint(caller, mesh.audience(name)),
        relay=name == "ping",
        ca_file=mesh.ca_file,
        connect_to=f".run.app={mesh.front}",
    )


async def tagged(mesh: Mesh, name: str, tag: str, **settings: str) -> str:
    """A new revision of `name` with `settings` added to its manifest's env, given `tag` and no traffic (the
    canary's first step); the tag's URL."""
    assert mesh.plan is not None and mesh.run is not None
    document: dict[str, Any] = yaml.safe_load(mesh.plan[name].manifest)
    container = document["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] not in settings]
    container["env"] += [{"name": k, "value": v} for k, v in settings.items()]
    document["spec"]["traffic"] = [
        {"revisionName": mesh.deployed[name], "percent": 100},
        {"latestRevision": True, "percent": 0, "tag": tag},
    ]
    await asyncio.to_thread(mesh.run.replace, yaml.safe_dump(document))
    return mesh.run.url(name, tag)


async def untagged(mesh: Mesh, name: str, tag: str) -> None:
    assert mesh.run is not None
    await asyncio.to_thread(mesh.run.update_traffic, name, remove_tags=[tag])


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", ["ping-upstream", "routeguide", "ping", "aggregator"])
async def test_every_service_of_the_mesh_passes(mesh: Mesh, name: str) -> None:
    await asyncio.to_thread(smoke.check, target(mesh, name))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_routeguide_on_the_wrong_database_fails_its_call(mesh: Mesh, tmp_path: Path) -> None:
    database = tmp_path / "features.json"
    write_database(generated_database(count=5), str(database))
    url = await tagged(mesh, "routeguide", "wrongdb", ROUTEGUIDE_DB=str(database))
    try:
        with pytest.raises(
            smoke.SmokeFailed, match=r"^routeguide.GetFeature: the first canonical place is named ''"
        ):
            await asyncio.to_thread(smoke.check, target(mesh, "routeguide", url))
    finally:
        await untagged(mesh, "routeguide", "wrongdb")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_ping_verifying_the_wrong_audience_fails_its_call(mesh: Mesh) -> None:
    url = await tagged(mesh, "ping", "wrongaud", AUTH_AUDIENCE="https://elsewhere.run.app")
    try:
        with pytest.raises(smoke.SmokeFailed, match=r"^ping.SendUpstream: UNAUTHENTICATED"):
            await asyncio.to_thread(smoke.check, target(mesh, "ping", url))
    finally:
        await untagged(mesh, "ping", "wrongaud")


def test_a_url_that_is_not_https_is_refused() -> None:
    with pytest.raises(smoke.SmokeFailed, match="is not an https URL"):
        smoke.check(smoke.Target("ping", "http://localhost:1", "token"))
