"""build-support/deploy/invokers.py: the IAM file's shape, and the gcloud commands that apply it."""

from __future__ import annotations

import pytest

from deploy.invokers import ROLE, binding_commands, load_invokers

FILE = """
invokers:
  ping: [aggregator-sa, mesh-client]
  ping-upstream: [ping-sa]
"""


def test_one_binding_per_service_and_caller() -> None:
    commands = binding_commands(load_invokers(FILE), project="demo-project", region="europe-west1")
    assert [(c[4], c[7]) for c in commands] == [
        ("ping", "--member=serviceAccount:aggregator-sa@demo-project.iam.gserviceaccount.com"),
        ("ping", "--member=serviceAccount:mesh-client@demo-project.iam.gserviceaccount.com"),
        ("ping-upstream", "--member=serviceAccount:ping-sa@demo-project.iam.gserviceaccount.com"),
    ]
    for command in commands:
        assert command[:4] == ["gcloud", "run", "services", "add-iam-policy-binding"]
        assert f"--role={ROLE}" in command and "--region=europe-west1" in command
        assert "--project=demo-project" in command


def test_only_the_named_services() -> None:
    commands = binding_commands(load_invokers(FILE), project="p-1234", region="r", services=["ping-upstream"])
    assert [c[4] for c in commands] == ["ping-upstream"]


def test_a_service_missing_from_the_file_is_an_error() -> None:
    with pytest.raises(ValueError, match="no invokers listed for routeguide"):
        binding_commands(load_invokers(FILE), project="p-1234", region="r", services=["routeguide"])


@pytest.mark.parametrize("member", ["allUsers", "allAuthenticatedUsers"])
def test_public_access_is_refused(member: str) -> None:
    with pytest.raises(ValueError, match="would be public"):
        load_invokers(f"invokers:\n  ping: [{member}]\n")


@pytest.mark.parametrize(
    "text", ["", "invokers: [ping]\n", "invokers:\n  ping: mesh-client\n", "invokers:\n  ping: [1]\n"]
)
def test_malformed_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        load_invokers(text)
