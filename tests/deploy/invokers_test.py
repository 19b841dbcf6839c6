"""build-support/deploy/invokers.py: the IAM file's shape, and the reconciliation of the live run.invoker
members with it, run through the deploy step's `gcloud` against the Cloud Run stand-in (cloudbuild.gcloud)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudbuild import gcloud
from cloudbuild.cloudrun import CloudRun

from deploy.invokers import ROLE, load_invokers, main

WHERE = ["--project=demo-project", "--region=europe-west1"]
FILE = """
invokers:
  ping: [aggregator-sa, mesh-client]
  ping-upstream: [ping-sa]
  routeguide: [aggregator-sa]
"""


def sa(account: str) -> str:
    return f"serviceAccount:{account}@demo-project.iam.gserviceaccount.com"


@pytest.fixture
def cloud_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudRun]:
    """The stand-in, with ping, ping-upstream and routeguide deployed, behind a `gcloud` first on PATH."""
    # No engine: the revisions run from source.
    stand_in = CloudRun(tmp_path, "123456789012", print)
    for name in ("ping", "ping-upstream", "routeguide"):
        stand_in.bindings[name] = set()
    control = gcloud.serve(stand_in)
    client = gcloud.write_client(tmp_path / "bin", sys.executable, sys.path)
    monkeypatch.setenv("PATH", f"{client.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(gcloud.URL_VARIABLE, f"http://127.0.0.1:{control.server_address[1]}")
    try:
        yield stand_in
    finally:
        control.shutdown()
        stand_in.close()


def invokers(cloud_run: CloudRun, service: str) -> set[str]:
    return {member for member, role in cloud_run.bindings[service] if role == ROLE}


def reconcile(tmp_path: Path, text: str, *args: str) -> int:
    path = tmp_path / "invokers.yaml"
    path.write_text(text)
    return main([*WHERE, f"--file={path}", *args])


def test_a_caller_taken_out_of_the_file_and_members_bound_by_hand_are_revoked(
    tmp_path: Path, cloud_run: CloudRun, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the previous deploy applied, and two bindings made by hand since.
    assert reconcile(tmp_path, FILE) == 0
    cloud_run.bindings["ping"] |= {("user:someone@example.com", ROLE), ("allUsers", ROLE)}
    cloud_run.bindings["ping"].add(("user:owner@example.com", "roles/run.developer"))
    capsys.readouterr()

    # mesh-client no longer calls ping.
    assert reconcile(tmp_path, FILE.replace("[aggregator-sa, mesh-client]", "[aggregator-sa]")) == 0
    assert invokers(cloud_run, "ping") == {sa("aggregator-sa")}
    assert ("user:owner@example.com", "roles/run.developer") in cloud_run.bindings["ping"]
    assert invokers(cloud_run, "ping-upstream") == {sa("ping-sa")}
    assert capsys.readouterr().out.splitlines() == [
        "invokers: ping: remove allUsers",
        f"invokers: ping: remove {sa('mesh-client')}",
        "invokers: ping: remove user:someone@example.com",
        "invokers: ping-upstream: unchanged",
        "invokers: routeguide: unchanged",
    ]
    removed = [
        json.loads(line)["member"]
        for line in cloud_run.record_file.read_text().splitlines()
        if json.loads(line)["command"] == "run services remove-iam-policy-binding"
    ]
    assert sorted(removed) == ["allUsers", sa("mesh-client"), "user:someone@example.com"]


def test_the_plan_adds_what_is_missing_and_a_dry_run_changes_nothing(
    tmp_path: Path, cloud_run: CloudRun, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud_run.bindings["routeguide"].add(("user:someone@example.com", ROLE))
    assert reconcile(tmp_path, FILE, "--dry-run", "routeguide") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"invokers: routeguide: add {sa('aggregator-sa')}",
        "invokers: routeguide: remove user:someone@example.com",
    ]
    assert invokers(cloud_run, "routeguide") == {"user:someone@example.com"}
    assert reconcile(tmp_path, FILE, "routeguide") == 0
    assert invokers(cloud_run, "routeguide") == {sa("aggregator-sa")}
    assert invokers(cloud_run, "ping") == set()  # only the named services


def test_a_service_not_deployed_fails_with_gcloud_s_error(
    tmp_path: Path, cloud_run: CloudRun, capsys: pytest.CaptureFixture[str]
) -> None:
    del cloud_run.bindings["routeguide"]
    assert reconcile(tmp_path, FILE, "routeguide") == 1
    assert "Cannot find service [routeguide]" in capsys.readouterr().err


def test_a_service_missing_from_the_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        reconcile(tmp_path, FILE, "aggregator")
    assert "no invokers listed for aggregator" in capsys.readouterr().err


@pytest.mark.parametrize("member", ["allUsers", "allAuthenticatedUsers"])
def test_public_access_is_refused(member: str) -> None:
    with pytest.raises(ValueError, match=f"'ping' would be public \\({member}\\): services are private"):
        load_invokers(f"invokers:\n  ping: [mesh-client, {member}]\n")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "invokers: [ping]\n",
        "invokers:\n  ping: mesh-client\n",
        "invokers:\n  ping: [1]\n",
        "invokers:\n  ping: ['user:me@example.com']\n",
        "invokers:\n  ping: [mesh-client@demo-project.iam.gserviceaccount.com]\n",
    ],
)
def test_malformed_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        load_invokers(text)
