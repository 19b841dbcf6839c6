"""The canary's order (callees first) and its rollback, against the runner's Cloud Run stand-in through the
real `gcloud` client the steps use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cloudbuild import gcloud
from cloudbuild.cloudrun import CloudRun

from deploy import canary
from deploy.layout import cloud_run_name, manifests
from deploy.reach import Topology, Vpc
from deploy.render import render_manifest

ROOT = Path(__file__).resolve().parents[2]
WHERE = ["--project=demo-project", "--region=europe-west1"]


def release(manifest: Path) -> canary.Release:
    values = {"PROJECT_ID": "demo-project", "PROJECT_NUMBER": "123456789012", "REGION": "europe-west1",
              "IMAGE": f"127.0.0.1:5000/demo-project/mesh/{manifest.parent.name}@sha256:abababababababababababababababababababababababababababababababab"}  # fmt: skip
    topology = Topology.load((ROOT / "services" / "invokers.yaml").read_text())
    text = render_manifest(manifest.read_text(), values, topology, Vpc("mesh", "mesh"))
    return canary.Release(cloud_run_name(manifest), yaml.safe_load(text))


def test_the_called_deploy_before_their_callers() -> None:
    given = [release(m) for s in ("aggregator", "ping", "routeguide") for m in manifests(ROOT, s)]
    assert [r.name for r in given] == ["aggregator", "ping-upstream", "ping", "routeguide"]
    order = [r.name for r in canary.callees_first(given)]
    assert order.index("ping-upstream") < order.index("ping") < order.index("aggregator")
    assert order.index("routeguide") < order.index("aggregator")
    # Alone, a service deploys by itself: its upstreams are not part of this release.
    assert [r.name for r in canary.callees_first([release(ROOT / "services/aggregator/service.yaml")])] == [
        "aggregator"
    ]


def test_traffic_steps_rise_to_100() -> None:
    assert canary.traffic_steps("10,50,100") == [10, 50, 100] and canary.traffic_steps("") == [100]
    for bad in ("50", "50,10,100", "0,100"):
        with pytest.raises(Exception, match="rising percentages"):
            canary.traffic_steps(bad)


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudRun]:
    # No engine: the revisions run from source.
    cloud_run = CloudRun(tmp_path, "123456789012", print)
    server = gcloud.serve(cloud_run)
    import sys

    gcloud.write_client(tmp_path / "bin", sys.executable, sys.path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    monkeypatch.setenv(gcloud.URL_VARIABLE, f"http://127.0.0.1:{server.server_address[1]}")
    yield cloud_run
    server.shutdown()
    cloud_run.platform.close()


def test_rollback_moves_the_traffic_to_previous_and_back(stand_in: CloudRun) -> None:
    manifest = release(ROOT / "services/ping/service.yaml").manifest
    for name, traffic in (
        ("ping-sha-1", None),
        ("ping-sha-2", [{"revisionName": "ping-sha-1", "percent": 0, "tag": "previous"}, {"latestRevision": True, "percent": 100}]),
    ):  # fmt: skip
        manifest["spec"]["template"]["metadata"]["name"] = name
        if traffic:
            manifest["spec"]["traffic"] = traffic
        stand_in.replace(yaml.safe_dump(manifest), "europe-west1")

    def serving() -> tuple[str, str]:
        routes = stand_in.platform.traffic("ping")
        return (
            next(r.revision for r in routes if r.percent == 100),
            next(r.revision for r in routes if r.tag == "previous"),
        )

    assert canary.main(["rollback", "ping", *WHERE]) == 0
    assert serving() == ("ping-sha-1", "ping-sha-2")
    assert canary.main(["rollback", "ping", *WHERE]) == 0  # a second rollback rolls forward
    assert serving() == ("ping-sha-2", "ping-sha-1")


def test_rollback_without_a_previous_revision_fails(
    stand_in: CloudRun, capsys: pytest.CaptureFixture[str]
) -> None:
    assert canary.main(["rollback", "routeguide", *WHERE]) == 1
    assert "routeguide: no revision is tagged 'previous'" in capsys.readouterr().err
