"""The Cloud Run manifests: Knative services with h2c, gRPC health probes and their own service account,
wired to upstreams that exist and that grant them roles/run.invoker (services/invokers.yaml); rendered, the
inside-only services take internal traffic only and their callers reach them through the VPC."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.invokers import load_invokers
from deploy.layout import INVOKERS_FILE, cloud_run_name, deployable_services, manifests
from deploy.reach import INGRESS, NETWORK_INTERFACES, VPC_EGRESS, Topology, Vpc, inside_only
from deploy.render import render, render_manifest
from mesh.settings import AuthSettings
from tests.deploy.repo import ROOT

HEALTH_SERVICE = {
    "ping": "ping.PingService",
    "routeguide": "routeguide.RouteGuide",
    "aggregator": "aggregator.v1.Aggregator",
}
MANIFESTS = [m for service in deployable_services(ROOT) for m in manifests(ROOT, service)]
NAMES = {cloud_run_name(m) for m in MANIFESTS}
INVOKERS = load_invokers((ROOT / INVOKERS_FILE).read_text())
TOPOLOGY = Topology.load((ROOT / INVOKERS_FILE).read_text())
INSIDE_ONLY = inside_only(TOPOLOGY.ingress)
VPC = Vpc("mesh", "mesh-europe-west1")
# Identities that are not a service of the mesh: callers from outside (people and scripts impersonate it).
EXTERNAL_CALLERS = {"mesh-client"}

UPSTREAM = re.compile(r"(?P<name>[a-z0-9-]+)-\$\{PROJECT_NUMBER\}\.\$\{REGION\}\.run\.app:443")
SA_EMAIL = re.compile(
    r"(?P<account>[a-z][a-z0-9-]{4,28}[a-z0-9])@\$\{PROJECT_ID\}\.iam\.gserviceaccount\.com"
)


def load(manifest: Path) -> dict[str, Any]:
    document = yaml.safe_load(manifest.read_text())
    assert isinstance(document, dict)
    return document


def container(manifest: Path) -> dict[str, Any]:
    containers = load(manifest)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env(manifest: Path) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container(manifest).get("env", [])}


def account(email: str) -> str:
    match = SA_EMAIL.fullmatch(email)
    assert match, f"{email!r} is not a service account of the deploy project"
    return match["account"]


def env_of(name: str) -> dict[str, str]:
    return env(next(m for m in MANIFESTS if cloud_run_name(m) == name))


def allowed(name: str) -> set[str]:
    return {account(email) for email in env_of(name)["AUTH_ALLOWED_CALLERS"].split(",")}


def by_name(manifest: Path) -> str:
    return str(manifest.relative_to(ROOT))


def upstreams(manifest: Path) -> set[str]:
    """The Cloud Run services this one calls, read from its address variables."""
    return {match["name"] for value in env(manifest).values() if (match := UPSTREAM.fullmatch(value))}


def values(manifest: Path) -> dict[str, str]:
    return {
        "PROJECT_ID": "demo-project",
        "PROJECT_NUMBER": "123456789012",
        "REGION": "europe-west1",
        "IMAGE": f"europe-west1-docker.pkg.dev/demo-project/mesh/{manifest.parent.name}@sha256:abababababababababababababababababababababababababababababababab",
    }


def rendered(manifest: Path, vpc: Vpc | None) -> dict[str, Any]:
    document = yaml.safe_load(render_manifest(manifest.read_text(), values(manifest), TOPOLOGY, vpc))
    assert isinstance(document, dict)
    return document


def revision_annotations(document: dict[str, Any]) -> dict[str, str]:
    return dict(document["spec"]["template"]["metadata"]["annotations"])


def test_the_four_cloud_run_services() -> None:
    # The sample's pair (ping relays to ping-upstream, one image) plus routeguide and aggregator.
    assert NAMES == {"ping", "ping-upstream", "routeguide", "aggregator"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_knative_service_named_by_its_file(manifest: Path) -> None:
    document = load(manifest)
    assert (document["apiVersion"], document["kind"]) == ("serving.knative.dev/v1", "Service")
    assert document["metadata"]["name"] == cloud_run_name(manifest)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_h2c_port_and_grpc_health_probes(manifest: Path) -> None:
    spec = container(manifest)
    assert spec["ports"] == [{"name": "h2c", "containerPort": 8080}]
    expected = {"port": 8080, "service": HEALTH_SERVICE[manifest.parent.name]}
    assert spec["startupProbe"]["grpc"] == expected
    assert spec["livenessProbe"]["grpc"] == expected
    # Cloud Run sets PORT itself and refuses a manifest that does.
    assert "PORT" not in env(manifest)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_own_service_account(manifest: Path) -> None:
    email = load(manifest)["spec"]["template"]["spec"]["serviceAccountName"]
    assert account(email) == f"{cloud_run_name(manifest)}-sa"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_streaming_and_background_export_settings(manifest: Path) -> None:
    template = load(manifest)["spec"]["template"]
    assert template["spec"]["timeoutSeconds"] == 3600
    assert 1 <= template["spec"]["containerConcurrency"] <= 1000
    assert template["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"
    variables = env(manifest)
    assert variables["OTEL_SERVICE_NAME"] == cloud_run_name(manifest)
    assert variables["OTEL_TRACES_EXPORTER"] == "gcp_trace"
    assert "gcp_trace" in variables["OTEL_PROPAGATORS"].split(",")
    assert variables["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert 0.0 <= float(variables["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_verifies_tokens_for_its_own_url(manifest: Path) -> None:
    name = cloud_run_name(manifest)
    assert env(manifest)["AUTH_AUDIENCE"] == f"https://{name}-${{PROJECT_NUMBER}}.${{REGION}}.run.app"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_starts_on_cloud_run_with_its_callers_checked(manifest: Path) -> None:
    # The settings code itself, with K_SERVICE as Cloud Run sets it: a manifest that forgot AUTH_AUDIENCE or
    # AUTH_ALLOWED_CALLERS would not start. None of ours leaves its callers to Cloud Run's IAM alone.
    variables = env(manifest)
    auth = AuthSettings.from_env({**variables, "K_SERVICE": cloud_run_name(manifest)})
    assert auth.audience and auth.allowed_callers and not auth.iam_only
    assert "AUTH_IAM_ONLY" not in variables


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_upstreams_exist_and_let_this_service_in(manifest: Path) -> None:
    caller = account(load(manifest)["spec"]["template"]["spec"]["serviceAccountName"])
    for variable, value in env(manifest).items():
        if ".run.app" not in value or variable == "AUTH_AUDIENCE":
            continue
        match = UPSTREAM.fullmatch(value)
        assert (
            match
        ), f"{variable}={value!r}: upstreams are <service>-${{PROJECT_NUMBER}}.${{REGION}}.run.app:443"
        upstream = match["name"]
        assert upstream in NAMES, f"{variable} names {upstream!r}, which is not a service of the mesh"
        assert caller in INVOKERS[upstream], f"services/invokers.yaml: {upstream} must let {caller} invoke it"
        assert caller in allowed(upstream), f"{upstream}'s AUTH_ALLOWED_CALLERS must list {caller}"


@pytest.mark.parametrize("name", sorted(NAMES))
def test_allowed_callers_are_exactly_the_invokers(name: str) -> None:
    # Cloud Run's IAM check and the service's own allow-list must agree, or one silently undoes the other.
    assert allowed(name) == set(INVOKERS[name])


def test_invokers_and_ingress_cover_every_service_with_known_accounts() -> None:
    assert set(INVOKERS) == set(TOPOLOGY.ingress) == NAMES
    service_accounts = {f"{name}-sa" for name in NAMES}
    for service, accounts in INVOKERS.items():
        assert set(accounts) <= service_accounts | EXTERNAL_CALLERS, service


def test_the_relay_and_the_aggregator_are_wired_as_designed() -> None:
    assert env_of("ping")["GRPC_PING_HOST"] == "ping-upstream-${PROJECT_NUMBER}.${REGION}.run.app:443"
    assert "GRPC_PING_HOST" not in env_of("ping-upstream")
    aggregator = env_of("aggregator")
    assert UPSTREAM.fullmatch(aggregator["PING_ADDR"])
    assert UPSTREAM.fullmatch(aggregator["ROUTEGUIDE_ADDR"])


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_renders_for_a_project(manifest: Path) -> None:
    image = values(manifest)["IMAGE"]
    text = render_manifest(manifest.read_text(), values(manifest), TOPOLOGY, VPC)
    assert "${" not in text
    document = yaml.safe_load(text)
    assert document["metadata"]["name"] == cloud_run_name(manifest)
    assert document["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert document["spec"]["template"]["spec"]["serviceAccountName"].endswith(
        "@demo-project.iam.gserviceaccount.com"
    )


def test_inside_only_by_default_routeguide_and_ping_upstream() -> None:
    # aggregator and ping stay reachable from outside, by mesh-client; the rest only the mesh calls.
    assert TOPOLOGY.ingress == {
        "aggregator": "all",
        "ping": "all",
        "ping-upstream": "internal",
        "routeguide": "internal",
    }


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_rendered_ingress_is_the_one_listed(manifest: Path) -> None:
    document = rendered(manifest, VPC)
    assert document["metadata"]["annotations"][INGRESS] == TOPOLOGY.ingress[cloud_run_name(manifest)]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_callers_of_inside_only_services_egress_through_the_vpc(manifest: Path) -> None:
    # Read from the addresses the service really calls, not from the invokers file the renderer uses.
    annotations = revision_annotations(rendered(manifest, VPC))
    if upstreams(manifest) & INSIDE_ONLY:
        assert json.loads(annotations[NETWORK_INTERFACES]) == [
            {"network": "mesh", "subnetwork": "mesh-europe-west1"}
        ]
        assert annotations[VPC_EGRESS] == "all-traffic"
    else:
        assert NETWORK_INTERFACES not in annotations and VPC_EGRESS not in annotations


@pytest.mark.parametrize("name", sorted(INSIDE_ONLY))
def test_nobody_outside_the_mesh_invokes_an_inside_only_service(name: str) -> None:
    # An outside caller could hold the role but never reach the service: the grant would only mislead.
    assert not set(INVOKERS[name]) & EXTERNAL_CALLERS
    assert not allowed(name) & EXTERNAL_CALLERS


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_without_a_vpc_renders_todays_open_manifests(manifest: Path) -> None:
    # _VPC=none: the manifest as written plus `ingress: all`, exactly what every service.yaml said before.
    today = yaml.safe_load(render(manifest.read_text(), values(manifest)))
    today["metadata"].setdefault("annotations", {})[INGRESS] = "all"
    assert rendered(manifest, None) == today


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_one_worker_process_per_vcpu_of_the_cpu_limit(manifest: Path) -> None:
    cpu = container(manifest)["resources"]["limits"]["cpu"]
    assert env(manifest)["WORKER_PROCESSES"] == str(math.ceil(float(cpu)))


@pytest.mark.parametrize("manifest", MANIFESTS, ids=by_name)
def test_call_metrics_go_to_cloud_monitoring(manifest: Path) -> None:
    settings = env(manifest)
    assert settings["OTEL_METRICS_EXPORTER"] == "gcp_monitoring"
    # Cloud Monitoring accepts a point of a time series at most every 5 s; a minute is its usual pace.
    assert int(settings["OTEL_METRIC_EXPORT_INTERVAL"]) >= 5000
