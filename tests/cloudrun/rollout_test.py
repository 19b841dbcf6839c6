"""The local Cloud Run deploying the services' own manifests (rendered as the pipeline renders them), each
revision's instances run from source the production way, reached through the front end by the service's
`run.app` name: a rollout 10 -> 50 -> 100 under load loses no call and really splits, and a revision that
fails its startup probe gets no traffic."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from cloudrun import runners
from cloudrun.platform import CloudRun, CloudRunError
from deploy.render import render
from mesh.testing import NO_REUSEPORT
from ping import ping_pb2, ping_pb2_grpc
from tests.cloudrun.instances import CALL_TIMEOUT_S, PROJECT_NUMBER, REGION, load

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "demo-project"
IMAGE = "127.0.0.1:5000/demo-project/mesh/ping@sha256:" + "ab" * 32
CALLER = f"ping-sa@{PROJECT}.iam.gserviceaccount.com"  # ping-upstream's one allowed caller
# Envoy picks a revision at random per request: 1,600 calls put a 5-point margin at 4 standard deviations for
# a 50/50 split (more for 10/90), so the check holds in practice, never flaky.
STEP_CALLS = 1600


def manifest(revision: str, traffic: list[dict[str, object]] | None = None, **env: str) -> str:
    """services/ping/service-upstream.yaml rendered for the test's project, named `revision`."""
    text = render(
        (ROOT / "services/ping/service-upstream.yaml").read_text(),
        {"PROJECT_ID": PROJECT, "PROJECT_NUMBER": PROJECT_NUMBER, "REGION": REGION, "IMAGE": IMAGE},
    )
    document = yaml.safe_load(text)
    document["spec"]["template"]["metadata"]["name"] = revision
    container = document["spec"]["template"]["spec"]["containers"][0]
    container["env"].extend({"name": k, "value": v} for k, v in env.items())
    if traffic is not None:
        document["spec"]["traffic"] = traffic
    return yaml.safe_dump(document)


@pytest.fixture
def cloud_run(tmp_path: Path) -> Iterator[CloudRun]:
    with CloudRun(tmp_path, project_number=PROJECT_NUMBER, region=REGION, runner=runners.from_source) as run:
        yield run


@contextlib.asynccontextmanager
async def caller(run: CloudRun, url: str) -> AsyncIterator[ping_pb2_grpc.PingServiceStub]:
    """A caller outside Cloud Run: TLS to the front end under the URL's name, with an ID token for it."""
    host = url.removeprefix("https://")
    token = run.identity.mint(CALLER, f"https://{run.front.host('ping-upstream')}")
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(run.ca_file.read_bytes()), grpc.access_token_call_credentials(token)
    )
    options = [*NO_REUSEPORT, ("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
    async with grpc.aio.secure_channel(run.front.address, credentials, options=options) as channel:
        yield ping_pb2_grpc.PingServiceStub(channel)


def completed(run: CloudRun, revision: str) -> int:
    name = f"cluster.{revision}.upstream_rq_completed"
    return run.front.stats(rf"^cluster\.{revision}\.upstream_rq_completed$").get(name, 0)


async def test_a_rollout_under_load_splits_as_told_and_loses_no_call(cloud_run: CloudRun) -> None:
    blue, green = "ping-upstream-blue", "ping-upstream-green"
    await asyncio.to_thread(cloud_run.replace, manifest(blue))
    # The canary's way: the new revision deployed with no traffic, reachable by its tag.
    traffic = [{"revisionName": blue, "percent": 100}, {"revisionName": green, "percent": 0, "tag": "canary"}]
    await asyncio.to_thread(cloud_run.replace, manifest(green, traffic))
    async with caller(cloud_run, cloud_run.url("ping-upstream", "canary")) as tagged:
        reply = await tagged.Send(ping_pb2.Request(message="canary"), timeout=CALL_TIMEOUT_S)
    assert reply.pong.message == "canary"
    assert completed(cloud_run, green) == 1  # the tag's URL reached the new revision, nothing else did
    measured = {}
    async with caller(cloud_run, cloud_run.url("ping-upstream")) as stub, load(stub) as calls:
        await calls.more(100)
        for percent in (10, 50, 100):
            await asyncio.to_thread(cloud_run.update_traffic, "ping-upstream", to_revisions={green: percent})
            await calls.more(50)  # the calls in flight as the traffic moved may be answered by either
            before = completed(cloud_run, blue), completed(cloud_run, green)
            await calls.more(STEP_CALLS)
            after = completed(cloud_run, blue), completed(cloud_run, green)
            blue_calls, green_calls = after[0] - before[0], after[1] - before[1]
            measured[percent] = 100 * green_calls / (blue_calls + green_calls)
        rows = {row.revision: row for row in cloud_run.snapshot()}
    assert calls.failed == {}, calls.failed
    assert all(abs(measured[p] - p) <= 5 for p in measured), measured
    # The old revision, left with neither traffic nor a tag, is scaled to zero; the new one serves.
    assert (rows[blue].instances, rows[green].instances, rows[green].percent) == (0, 1, 100), rows


async def test_a_revision_failing_its_startup_probe_gets_no_traffic(cloud_run: CloudRun) -> None:
    serving = "ping-upstream-serving"
    await asyncio.to_thread(cloud_run.replace, manifest(serving))
    # It exits at start-up (a setting it refuses), so its probe never passes, though it would take all traffic.
    broken = manifest("ping-upstream-broken", KEEPALIVE_TIME_SECONDS="never")
    with pytest.raises(CloudRunError, match="ping-upstream-broken' is not ready and cannot serve traffic"):
        await asyncio.to_thread(cloud_run.replace, broken)
    assert cloud_run.traffic("ping-upstream")[0].revision == serving
    assert [r.revision for r in cloud_run.snapshot()] == [serving]
    assert cloud_run.describe("ping-upstream")["status"]["latestReadyRevisionName"] == serving
    async with caller(cloud_run, cloud_run.url("ping-upstream")) as stub:
        for _ in range(20):
            await stub.Send(ping_pb2.Request(message="still"), timeout=CALL_TIMEOUT_S)
    assert completed(cloud_run, serving) == 20
    assert "cluster.ping-upstream-broken" not in str(cloud_run.front.stats(r"ping-upstream-broken"))


def test_instances_get_the_production_environment_and_nothing_is_left_running(tmp_path: Path) -> None:
    seen: list[str] = []
    env_of = {}

    def runner(revision: runners.Revision) -> runners.Launcher:
        env_of.update(runners.instance_env(revision, 0, None))
        return runners.from_source(revision, on_line=lambda name, line: seen.append(f"{name}|{line}"))

    with CloudRun(tmp_path, project_number=PROJECT_NUMBER, region=REGION, runner=runner) as run:
        run.replace(manifest("ping-upstream-env"))
        (row,) = run.snapshot()
        pids = children(os.getpid())
    assert row.instances == 1 and pids, (row, pids)
    assert "TLS_CERT_FILE" not in env_of and env_of["BIND_HOST"] == "127.0.0.1"
    assert env_of["MESH_CONNECT_TO"].startswith(".run.app=127.0.0.1:")
    assert (env_of["K_SERVICE"], env_of["K_REVISION"], env_of["K_CONFIGURATION"]) == (
        "ping-upstream", "ping-upstream-env", "ping-upstream",
    )  # fmt: skip
    assert any(line.startswith("ping-upstream-env|") and "serving" in line for line in seen), seen[-5:]
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"], pids


def children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"
