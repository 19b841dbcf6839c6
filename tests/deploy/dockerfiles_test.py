"""Every Dockerfile is hadolint-clean, and each service image has the shape Cloud Run needs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deploy.layout import deployable_services
from tests.deploy.repo import ROOT, installed_tool

SERVICES = deployable_services(ROOT)
# One recipe for every service image, built with SERVICE=<name> (each service folder's Dockerfile links to it).
SERVICE_DOCKERFILE = ROOT / "services" / "Dockerfile"
DOCKERFILES = [SERVICE_DOCKERFILE, ROOT / "build-support" / "deploy" / "builder.Dockerfile"]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed_tool("hadolint")), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_every_deployable_service_builds_from_the_one_dockerfile() -> None:
    folders = sorted(p.parent.name for p in (ROOT / "services").glob("*/Dockerfile"))
    assert folders == SERVICES
    for service in SERVICES:
        assert (ROOT / "services" / service / "Dockerfile").read_text() == SERVICE_DOCKERFILE.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proves the check above is live: an untagged base and a shell-form entrypoint are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nENTRYPOINT python -m x\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_service_image_shape(service: str) -> None:
    steps = instructions(SERVICE_DOCKERFILE)
    args = {kind: [a for k, a in steps if k == kind] for kind in {k for k, _ in steps}}

    assert all(base.startswith("python:3.11-slim") for base in args["FROM"])
    # The install stage declares the build argument, and with it names the PEX at the path that Pants' docker
    # context and cloudbuild.yaml's (dist/) both hold.
    assert "SERVICE" in args["ARG"]
    copies = [copy.split()[0].replace("${SERVICE}", service) for copy in args["COPY"]]
    assert f"services.{service}/{service}.pex" in copies
    assert any("PEX_TOOLS=1" in run and "venv --compile" in run for run in args["RUN"])
    assert any("/etc/ssl/certs/ca-certificates.crt" in run for run in args["RUN"])
    user = args["USER"][-1].split(":")[0]
    assert user not in {"0", "root"}
    assert "PORT=8080" in " ".join(args["ENV"])
    # Exec form: the server process itself receives SIGTERM.
    assert json.loads(args["ENTRYPOINT"][-1]) == ["/app/pex"]
