"""What Cloud Run accepts as a service manifest (`gcloud run services replace FILE`), checked the way the Admin
API refuses one: the Knative kind, names Cloud Run allows, one container with an image reference, no PORT of
its own, a gRPC or TCP startup probe on the container's port, and a traffic block whose percents add up.

A manifest that passes becomes a RevisionSpec: what the local Cloud Run needs to run the revision, with
Cloud Run's defaults for what it leaves out (containerConcurrency 80, timeoutSeconds 300, maxScale 100) and one
local default: minScale 1 (Cloud Run's is 0), so a deployed revision answers its first call without a cold
start and a test sees its instance from the start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

# Cloud Run service and revision names: RFC 1035 labels; a service name at most 49 characters.
SERVICE_NAME = re.compile(r"[a-z]([a-z0-9-]{0,47}[a-z0-9])?")
REVISION_NAME = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
TAG = re.compile(r"[a-z]([a-z0-9-]{0,44}[a-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
# registry/path:tag or @sha256:digest, as docker reads a reference (no unrendered ${...}).
IMAGE = re.compile(r"[a-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)+(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})")
RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
PORT_NAMES = {"h2c", "http1"}
MIN_SCALE = "autoscaling.knative.dev/minScale"
MAX_SCALE = "autoscaling.knative.dev/maxScale"
DEFAULT_CONCURRENCY = 80  # Cloud Run's
MAX_CONCURRENCY = 1000
DEFAULT_TIMEOUT_S = 300  # Cloud Run's
MAX_TIMEOUT_S = 3600
DEFAULT_MIN_SCALE = 1  # local (Cloud Run's is 0): see above
DEFAULT_MAX_SCALE = 100  # Cloud Run's


class InvalidManifest(ValueError):
    """The message lists every reason, as the Admin API's INVALID_ARGUMENT does."""


@dataclass(frozen=True)
class Traffic:
    revision: str | None  # None: the latest ready revision
    percent: int
    tag: str | None


@dataclass(frozen=True)
class RevisionSpec:
    service: str
    revision: str | None  # template.metadata.name, or None for a generated name
    image: str
    env: Mapping[str, str]
    service_account: str
    container_port: int
    probe_service: str | None  # the grpc startup probe's service ("" for the server as a whole)
    traffic: tuple[Traffic, ...]  # empty: 100% to the latest revision
    region: str | None  # the cloud.googleapis.com/location label
    concurrency: int = DEFAULT_CONCURRENCY  # containerConcurrency: each instance's cap of calls in flight
    timeout_s: int = DEFAULT_TIMEOUT_S  # timeoutSeconds: a call's (and a stream's) whole life
    min_scale: int = DEFAULT_MIN_SCALE
    max_scale: int = DEFAULT_MAX_SCALE

    @property
    def folder(self) -> str:
        """The service folder the image is built from: its repository's last path segment (`.../ping@sha256:..`
        -> `ping`, as `services/<folder>` is pushed)."""
        return re.split(r"[:@]", self.image.rsplit("/", 1)[-1], maxsplit=1)[0]


def parse(text: str) -> RevisionSpec:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidManifest(f"not YAML: {error}") from None
    errors: list[str] = []
    if not isinstance(document, dict):
        raise InvalidManifest("a manifest is a Knative Service object")
    if (document.get("apiVersion"), document.get("kind")) != ("serving.knative.dev/v1", "Service"):
        errors.append("apiVersion/kind must be serving.knative.dev/v1 Service")
    metadata = _map(document, "metadata", errors)
    name = str(metadata.get("name", ""))
    if not SERVICE_NAME.fullmatch(name):
        errors.append(f"metadata.name {name!r} is not a valid service name (lowercase, digits, '-', <= 49)")
    template = _map(_map(document, "spec", errors), "template", errors)
    template_metadata = _map(template, "metadata", errors)
    revision = template_metadata.get("name")
    if revision is not None and (
        not REVISION_NAME.fullmatch(str(revision)) or not str(revision).startswith(f"{name}-")
    ):
        errors.append(
            f"spec.template.metadata.name {revision!r} must be {name}-<suffix> (lowercase, digits, '-')"
        )
    spec = _map(template, "spec", errors)
    containers = spec.get("containers")
    if not isinstance(containers, list) or len(containers) != 1 or not isinstance(containers[0], dict):
        errors.append("spec.template.spec.containers must hold exactly one container")
        raise InvalidManifest("; ".join(errors))
    container = containers[0]
    image = str(container.get("image", ""))
    if not IMAGE.fullmatch(image):
        errors.append(f"image {image!r} is not a registry image reference")
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        key = str(item.get("name", ""))
        if not ENV_NAME.fullmatch(key):
            errors.append(f"env name {key!r} is invalid")
        elif key in RESERVED_ENV:
            errors.append(f"env {key} is reserved: Cloud Run sets it")
        elif "value" not in item:
            errors.append(f"env {key} has no value (valueFrom secrets are not emulated)")
        else:
            env[key] = str(item["value"])
    ports = container.get("ports") or [{"containerPort": 8080}]
    port = ports[0].get("containerPort", 8080) if len(ports) == 1 else None
    if len(ports) != 1 or not isinstance(port, int) or not 1 <= port <= 65535:
        errors.append("a container has one port, 1-65535")
        port = 8080
    if ports[0].get("name", "http1") not in PORT_NAMES:
        errors.append(f"port name must be one of {sorted(PORT_NAMES)}")
    probe = container.get("startupProbe") or {}
    probe_service = None
    if "grpc" in probe:
        if probe["grpc"].get("port", port) != port:
            errors.append("startupProbe.grpc.port must be the container port")
        probe_service = str(probe["grpc"].get("service", ""))
    account = str(spec.get("serviceAccountName", ""))
    if account and not re.fullmatch(
        r"[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9.-]+\.iam\.gserviceaccount\.com", account
    ):
        errors.append(f"serviceAccountName {account!r} is not a service account email")
    traffic = tuple(_traffic(document["spec"].get("traffic") or [], errors))
    concurrency = _bounded(spec, "containerConcurrency", DEFAULT_CONCURRENCY, MAX_CONCURRENCY, errors)
    timeout_s = _bounded(spec, "timeoutSeconds", DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, errors)
    annotations = template_metadata.get("annotations") or {}
    min_scale = _bounded(annotations, MIN_SCALE, DEFAULT_MIN_SCALE, MAX_CONCURRENCY, errors, low=0)
    max_scale = _bounded(annotations, MAX_SCALE, DEFAULT_MAX_SCALE, MAX_CONCURRENCY, errors)
    if min_scale > max_scale:
        errors.append(f"{MIN_SCALE} {min_scale} is above {MAX_SCALE} {max_scale}")
    if errors:
        raise InvalidManifest("; ".join(errors))
    labels = metadata.get("labels") or {}
    return RevisionSpec(
        service=name,
        revision=str(revision) if revision is not None else None,
        image=image,
        env=env,
        service_account=account,
        container_port=int(port),
        probe_service=probe_service,
        traffic=traffic,
        region=labels.get("cloud.googleapis.com/location"),
        concurrency=concurrency,
        timeout_s=timeout_s,
        min_scale=min_scale,
        max_scale=max_scale,
    )


def _bounded(
    parent: Mapping[str, Any], key: str, default: int, high: int, errors: list[str], *, low: int = 1
) -> int:
    """An integer field (annotations are strings: "10") within low..high; `default` when absent."""
    raw = parent.get(key)
    if raw is None:
        return default
    try:
        value = int(str(raw))
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        errors.append(f"{key} {raw!r} must be an integer {low}-{high}")
        return default
    return value


def _map(parent: Mapping[str, Any], key: str, errors: list[str]) -> Mapping[str, Any]:
    value = parent.get(key) or {}
    if not isinstance(value, dict):
        errors.append(f"{key} must be a mapping")
        return {}
    return value


def _traffic(entries: list[Any], errors: list[str]) -> list[Traffic]:
    targets = []
    for entry in entries:
        latest = bool(entry.get("latestRevision"))
        revision = entry.get("revisionName")
        if latest == (revision is not None):
            errors.append("each traffic target names a revisionName or latestRevision: true")
        tag = entry.get("tag")
        if tag is not None and not TAG.fullmatch(str(tag)):
            errors.append(f"traffic tag {tag!r} is invalid")
        targets.append(Traffic(None if latest else str(revision), int(entry.get("percent", 0)), tag))
    if targets and sum(t.percent for t in targets) != 100:
        errors.append("traffic percents must add up to 100")
    tags = [t.tag for t in targets if t.tag]
    if len(tags) != len(set(tags)):
        errors.append("traffic tags must be unique")
    return targets
