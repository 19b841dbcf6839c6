"""The names Cloud Run gives a service and its tags: `https://SERVICE-NUMBER.REGION.run.app` (the
deterministic URL the manifests' upstream addresses use) and `https://TAG---SERVICE-NUMBER.REGION.run.app`."""

from __future__ import annotations

TAG_SEPARATOR = "---"


def service_host(service: str, project_number: str, region: str) -> str:
    return f"{service}-{project_number}.{region}.run.app"


def tag_host(tag: str, service_host: str) -> str:
    return f"{tag}{TAG_SEPARATOR}{service_host}"


def wildcard(region: str) -> str:
    """The certificate name that covers every service and tag host of `region` (a wildcard spans one label,
    and `TAG---SERVICE-NUMBER` is one label), so services and tags come and go without a new certificate."""
    return f"*.{region}.run.app"
