"""Where the deployable services and their Cloud Run manifests live in the repo."""

from __future__ import annotations

from pathlib import Path

SERVICES_DIR = "services"
MANIFEST_GLOB = "service*.yaml"
# Who may invoke and who can reach each Cloud Run service (deploy/invokers.py, deploy/reach.py).
INVOKERS_FILE = Path(SERVICES_DIR) / "invokers.yaml"


def deployable_services(root: Path) -> list[str]:
    """The services/<name>/ folders that hold a Cloud Run manifest, sorted."""
    return sorted(
        p.parent.name
        for p in (root / SERVICES_DIR).glob(f"*/{MANIFEST_GLOB}")
        if p.is_file() and p.name == "service.yaml"
    )


def manifests(root: Path, service: str) -> list[Path]:
    """The Cloud Run manifests of one service folder: service.yaml, plus service-<role>.yaml for each extra
    Cloud Run service deployed from the same image (ping's ping-upstream)."""
    return sorted((root / SERVICES_DIR / service).glob(MANIFEST_GLOB))


def cloud_run_name(manifest: Path) -> str:
    """services/ping/service.yaml -> ping; services/ping/service-upstream.yaml -> ping-upstream.

    The manifest's metadata.name follows this convention (tests/deploy checks it), so the pipeline can name
    rendered files and IAM targets without parsing YAML.
    """
    role = manifest.stem.removeprefix("service")
    return manifest.parent.name + role
