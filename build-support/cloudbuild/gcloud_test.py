"""The gcloud stand-in refuses what gcloud and the Admin API refuse, records every command, and moves traffic
as Cloud Run does (revisions run from source here; from images in tests/pipeline, which has an engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cloudbuild.cloudrun import CloudRun
from cloudbuild.gcloud import answer

from cloudrun.manifest import InvalidManifest, parse
from deploy.reach import Topology, Vpc
from deploy.render import render_manifest

ROOT = Path(__file__).resolve().parents[2]
WHERE = ["--project=demo-project", "--region=europe-west1"]


@pytest.fixture
def cloud_run(tmp_path: Path) -> Iterator[CloudRun]:
    # No engine: the revisions these tests deploy run from source.
    stand_in = CloudRun(tmp_path, "123456789012", print)
    yield stand_in
    stand_in.close()


def records(cloud_run: CloudRun) -> list[dict[str, object]]:
    return [json.loads(line) for line in cloud_run.record_file.read_text().splitlines()]


def rendered(tmp_path: Path, service: str = "ping") -> Path:
    manifest = ROOT / "services" / service / "service.yaml"
    values = {
        "PROJECT_ID": "demo-project",
        "PROJECT_NUMBER": "123456789012",
        "REGION": "europe-west1",
        "IMAGE": f"127.0.0.1:5000/demo-project/mesh/{service}@sha256:abababababababababababababababababababababababababababababababab",
    }
    topology = Topology.load((ROOT / "services" / "invokers.yaml").read_text())
    out = tmp_path / f"{service}.yaml"
    out.write_text(render_manifest(manifest.read_text(), values, topology, Vpc("mesh", "mesh")))
    return out


def test_unknown_flags_commands_and_missing_region_are_refused_and_recorded(cloud_run: CloudRun) -> None:
    refused = answer(cloud_run, ["run", "services", "replace", "f.yaml", *WHERE, "--no-traffic"], Path("."))
    assert (refused.code, refused.stderr) == (
        2,
        "ERROR: (gcloud.run.services.replace) unrecognized arguments: --no-traffic\n",
    )
    missing = answer(
        cloud_run,
        ["run", "services", "describe", "ping", "--project=demo-project", "--format=json"],
        Path("."),
    )
    assert missing.code == 2 and "the following arguments are required: --region" in missing.stderr
    assert answer(cloud_run, ["run", "deploy", "ping", *WHERE], Path(".")).code == 2
    assert [r["command"] for r in records(cloud_run)] == ["refused"] * 3


def test_every_rendered_manifest_is_a_valid_cloud_run_service(tmp_path: Path) -> None:
    for service in ("ping", "routeguide", "aggregator"):
        spec = parse(rendered(tmp_path, service).read_text())
        assert spec.service == service and spec.image.endswith(
            f"/{service}@sha256:abababababababababababababababababababababababababababababababab"
        )
        assert spec.probe_service and spec.container_port == 8080


def test_manifests_cloud_run_would_refuse(tmp_path: Path, cloud_run: CloudRun) -> None:
    # Unrendered: ${IMAGE} is no image reference.
    raw = answer(
        cloud_run, ["run", "services", "replace", str(ROOT / "services/ping/service.yaml"), *WHERE], Path(".")
    )
    assert raw.code == 1 and "is not a registry image reference" in raw.stderr
    document = yaml.safe_load(rendered(tmp_path).read_text())
    container = document["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "PORT", "value": "9000"})
    document["spec"]["traffic"] = [{"latestRevision": True, "percent": 90}]
    with pytest.raises(InvalidManifest) as refused:
        parse(yaml.safe_dump(document))
    assert "env PORT is reserved" in str(refused.value) and "percents must add up to 100" in str(
        refused.value
    )
    document = yaml.safe_load(rendered(tmp_path).read_text())
    document["spec"]["template"]["metadata"]["name"] = "other-sha-1"
    with pytest.raises(InvalidManifest, match="must be ping-<suffix>"):
        parse(yaml.safe_dump(document))


def test_describe_of_a_service_never_deployed(cloud_run: CloudRun) -> None:
    missing = answer(cloud_run, ["run", "services", "describe", "ping", *WHERE, "--format=json"], Path("."))
    assert (missing.code, missing.stderr) == (
        1,
        "ERROR: (gcloud.run.services.describe) Cannot find service [ping]\n",
    )


def test_traffic_moves_by_revision_and_tag_as_cloud_run_moves_it(cloud_run: CloudRun, tmp_path: Path) -> None:
    document = yaml.safe_load(rendered(tmp_path).read_text())
    for name, targets in (
        ("ping-old", None),
        ("ping-new", [{"revisionName": "ping-old", "percent": 100}, {"latestRevision": True, "percent": 0, "tag": "sha-1"}]),
    ):  # fmt: skip
        document["spec"]["template"]["metadata"]["name"] = name
        if targets:
            document["spec"]["traffic"] = targets
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(document))
        done = answer(
            cloud_run, ["run", "services", "replace", str(tmp_path / f"{name}.yaml"), *WHERE], Path(".")
        )
        assert done.code == 0, done.stderr

    def traffic(*flags: str) -> list[tuple[str, int, str | None]]:
        done = answer(cloud_run, ["run", "services", "update-traffic", "ping", *flags, *WHERE], Path("."))
        assert done.code == 0, done.stderr
        return [(r.revision, r.percent, r.tag) for r in cloud_run.platform.traffic("ping")]

    assert traffic("--to-revisions=ping-new=10") == [("ping-old", 90, None), ("ping-new", 10, "sha-1")]
    assert traffic("--to-tags=sha-1=100") == [("ping-new", 100, "sha-1")]
    assert traffic("--remove-tags=sha-1", "--update-tags=previous=ping-old") == [
        ("ping-old", 0, "previous"),
        ("ping-new", 100, None),
    ]
    described = json.loads(
        answer(cloud_run, ["run", "services", "describe", "ping", *WHERE, "--format=json"], Path(".")).stdout
    )
    # The front end's URLs: the service's, and the tag's (which reaches its revision alone).
    assert described["status"]["url"] == "https://ping-123456789012.europe-west1.run.app"
    assert {
        "revisionName": "ping-old",
        "percent": 0,
        "tag": "previous",
        "url": "https://previous---ping-123456789012.europe-west1.run.app",
    } in described["status"]["traffic"]
    unknown = answer(
        cloud_run,
        ["run", "services", "update-traffic", "ping", "--to-revisions=ping-gone=100", *WHERE],
        Path("."),
    )
    assert unknown.code == 1 and "Revision [ping-gone] of service [ping] does not exist" in unknown.stderr


def test_identity_tokens_are_minted_for_the_impersonated_caller(cloud_run: CloudRun) -> None:
    argv = ["auth", "print-identity-token", "--impersonate-service-account=aggregator-sa@demo-project.iam.gserviceaccount.com",
            "--audiences=https://ping-123456789012.europe-west1.run.app", "--include-email"]  # fmt: skip
    token = answer(cloud_run, argv, Path(".")).stdout.strip()
    assert token.count(".") == 2
    assert token not in cloud_run.record_file.read_text()  # recorded, but never the token
