"""build-support/deploy/reach.py: the ingress file's shape, who gets VPC egress, and the annotations."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.reach import (
    INGRESS,
    NETWORK_INTERFACES,
    VPC_EGRESS,
    Reach,
    Topology,
    Vpc,
    annotate,
    load_ingress,
)

FILE = """
invokers:
  front: [mesh-client]
  relay: [front-sa]
  back: [relay-sa]
ingress:
  front: all
  relay: all
  back: internal-and-cloud-load-balancing
"""
VPC = Vpc("mesh", "mesh-europe-west1")


def document() -> dict[str, Any]:
    return {"metadata": {"name": "relay"}, "spec": {"template": {"spec": {}}}}


def test_only_callers_of_an_inside_only_service_get_egress() -> None:
    topology = Topology.load(FILE)
    assert topology.reach("front", "front-sa", VPC) == Reach("all", None)
    assert topology.reach("relay", "relay-sa", VPC) == Reach("all", VPC)
    assert topology.reach("back", "back-sa", VPC) == Reach("internal-and-cloud-load-balancing", None)


def test_without_a_vpc_every_service_is_open_and_keeps_its_own_egress() -> None:
    topology = Topology.load(FILE)
    for service in ("front", "relay", "back"):
        assert topology.reach(service, f"{service}-sa", None) == Reach("all", None)


def test_a_service_missing_from_ingress_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ingress listed for extra"):
        Topology.load(FILE).reach("extra", "extra-sa", VPC)


@pytest.mark.parametrize(
    "text", ["", "ingress: [ping]\n", "ingress:\n  ping: private\n", "ingress:\n  ping: [all]\n"]
)
def test_malformed_ingress_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ingress"):
        load_ingress(text)


@pytest.mark.parametrize(("network", "subnet"), [("Mesh", "mesh"), ("mesh", 'a","x":"b'), ("mesh", "")])
def test_network_names_that_could_bend_the_annotation_are_refused(network: str, subnet: str) -> None:
    with pytest.raises(ValueError, match="is not a VPC"):
        Vpc(network, subnet)


def test_annotates_ingress_on_the_service_and_egress_on_its_revisions() -> None:
    manifest = document()
    annotate(manifest, Reach("internal", VPC))
    assert manifest["metadata"]["annotations"] == {INGRESS: "internal"}
    revision = manifest["spec"]["template"]["metadata"]["annotations"]
    assert json.loads(revision[NETWORK_INTERFACES]) == [
        {"network": "mesh", "subnetwork": "mesh-europe-west1"}
    ]
    assert revision[VPC_EGRESS] == "all-traffic"


def test_no_egress_writes_no_network_annotations() -> None:
    manifest = document()
    annotate(manifest, Reach("all", None))
    assert manifest["metadata"]["annotations"] == {INGRESS: "all"}
    assert manifest["spec"]["template"]["metadata"]["annotations"] == {}


@pytest.mark.parametrize("where", ["service", "revision"])
def test_a_manifest_that_sets_its_own_reach_is_refused(where: str) -> None:
    manifest = document()
    if where == "service":
        manifest["metadata"]["annotations"] = {INGRESS: "all"}
    else:
        manifest["spec"]["template"]["metadata"] = {"annotations": {VPC_EGRESS: "private-ranges-only"}}
    with pytest.raises(ValueError, match="set from services/invokers.yaml"):
        annotate(manifest, Reach("internal", None))
