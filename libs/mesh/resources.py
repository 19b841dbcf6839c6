"""The OpenTelemetry resource of a service's process, shared by its traces and its metrics."""

from __future__ import annotations

import uuid
from typing import Any

from opentelemetry.sdk.resources import Resource

from mesh.settings import Env, text


def resource_from_env(env: Env, service: str) -> Resource:
    """service.name from OTEL_SERVICE_NAME (default: the service), service.version from Cloud Run's K_REVISION,
    and a service.instance.id of this process: every instance (and every worker of one) writes its own time
    series, which Cloud Monitoring requires (it maps the pair to a `generic_task`: job and task id)."""
    attributes: dict[str, Any] = {
        "service.name": text(env, "OTEL_SERVICE_NAME", service),
        "service.instance.id": uuid.uuid4().hex,
    }
    if revision := text(env, "K_REVISION"):
        attributes["service.version"] = revision
    return Resource.create(attributes)
