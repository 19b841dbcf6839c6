"""Who can reach a Cloud Run service on the network: services/invokers.yaml's `ingress`, written into a
rendered manifest as Cloud Run's annotations.

A service whose ingress is not `all` is inside-only: Cloud Run lets a call from another Cloud Run service in
only when it arrives through a VPC network of the project. So every service whose account invokes an
inside-only one gets Direct VPC egress with all its traffic through the VPC (whose subnet has Private Google
Access, the path to *.run.app and Google's APIs). Without a VPC every service stays `all`, guarded by IAM alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from deploy.invokers import load_invokers

INGRESS = "run.googleapis.com/ingress"
NETWORK_INTERFACES = "run.googleapis.com/network-interfaces"
VPC_EGRESS = "run.googleapis.com/vpc-access-egress"
OPEN = "all"
SETTINGS = (OPEN, "internal", "internal-and-cloud-load-balancing")
# A Compute Engine network or subnet name (it lands in a JSON string inside a YAML scalar).
RESOURCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Vpc:
    """The network and subnet (in the services' region) that callers of inside-only services send through."""

    network: str
    subnet: str

    def __post_init__(self) -> None:
        for kind, name in (("network", self.network), ("subnet", self.subnet)):
            if not RESOURCE_NAME.fullmatch(name):
                raise ValueError(f"{kind} {name!r} is not a VPC {kind} name (lowercase letters, digits, -)")


@dataclass(frozen=True)
class Reach:
    """One Cloud Run service's place on the network."""

    ingress: str  # one of SETTINGS
    egress: Vpc | None  # Direct VPC egress for all traffic, or none


def load_ingress(text: str) -> dict[str, str]:
    """Cloud Run service name -> its ingress setting."""
    document = yaml.safe_load(text)
    ingress = document.get("ingress") if isinstance(document, dict) else None
    if not isinstance(ingress, dict):
        raise ValueError("expected a mapping `ingress: {service: all | internal | ...}`")
    for service, setting in ingress.items():
        if setting not in SETTINGS:
            raise ValueError(f"ingress of {service!r} is {setting!r}; expected one of {', '.join(SETTINGS)}")
    return {str(service): str(setting) for service, setting in ingress.items()}


def inside_only(ingress: Mapping[str, str]) -> set[str]:
    return {service for service, setting in ingress.items() if setting != OPEN}


@dataclass(frozen=True)
class Topology:
    """services/invokers.yaml: who may invoke each service, and its ingress."""

    invokers: Mapping[str, Sequence[str]]
    ingress: Mapping[str, str]

    @classmethod
    def load(cls, text: str) -> Topology:
        return cls(load_invokers(text), load_ingress(text))

    def reach(self, service: str, account: str, vpc: Vpc | None) -> Reach:
        """Where `service`, running as `account` (a service-account id), sits; vpc None: no VPC, all `all`."""
        if vpc is None:
            return Reach(OPEN, None)
        if service not in self.ingress:
            raise ValueError(f"no ingress listed for {service}")
        inside = inside_only(self.ingress)
        calls_inside = any(account in self.invokers.get(callee, ()) for callee in inside)
        return Reach(self.ingress[service], vpc if calls_inside else None)


def annotate(document: dict[str, Any], reach: Reach) -> None:
    """Writes reach into a Knative service document: ingress on the service, egress on its revisions."""
    service = document["metadata"].setdefault("annotations", {})
    revision = document["spec"]["template"].setdefault("metadata", {}).setdefault("annotations", {})
    written_by_hand = {INGRESS, NETWORK_INTERFACES, VPC_EGRESS}.intersection({*service, *revision})
    if written_by_hand:
        raise ValueError(f"{', '.join(sorted(written_by_hand))}: set from services/invokers.yaml, not here")
    service[INGRESS] = reach.ingress
    if reach.egress is not None:
        interface = {"network": reach.egress.network, "subnetwork": reach.egress.subnet}
        revision[NETWORK_INTERFACES] = json.dumps([interface], separators=(",", ":"))
        revision[VPC_EGRESS] = "all-traffic"
