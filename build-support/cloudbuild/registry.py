"""A real Docker registry on loopback standing in for Artifact Registry: Debian's `docker-registry`
(distribution 2.8), installed when missing, on a free port, its storage in a folder of the caller's, stopped
by whoever started it. dockerd pushes to 127.0.0.0/8 over plain HTTP without configuration."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import debian

PACKAGE = "docker-registry"
START_TIMEOUT_S = 20.0
# The manifest types dockerd pushes; without them distribution answers with a converted (other) manifest.
MANIFESTS = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])  # fmt: skip


@dataclass
class Registry:
    address: str  # host:port, the image name prefix
    process: subprocess.Popen[bytes]

    def images(self) -> dict[str, list[str]]:
        """Repository -> its tags, as the registry's API lists them."""

        def get(path: str) -> dict[str, Any]:
            with urllib.request.urlopen(f"http://{self.address}/v2/{path}", timeout=5) as answer:
                return dict(json.loads(answer.read()))

        return {
            repo: sorted(get(f"{repo}/tags/list").get("tags") or [])
            for repo in get("_catalog")["repositories"]
        }

    def digests(self) -> dict[str, str]:
        """`repository:tag` -> the digest of its manifest, as the registry names it (what a pull by digest gets)."""
        found = {}
        for repo, tags in self.images().items():
            for tag in tags:
                request = urllib.request.Request(
                    f"http://{self.address}/v2/{repo}/manifests/{tag}",
                    method="HEAD",
                    headers={"Accept": MANIFESTS},
                )
                with urllib.request.urlopen(request, timeout=5) as answer:
                    found[f"{repo}:{tag}"] = answer.headers["Docker-Content-Digest"]
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def program() -> str:
    found = shutil.which("docker-registry", path=debian.SYSTEM_PATH)
    if found:
        return found
    why_not = debian.can_install()
    if why_not:
        raise RuntimeError(f"no docker-registry on PATH and it cannot be installed here ({why_not})")
    debian.install([PACKAGE])
    return shutil.which("docker-registry", path=debian.SYSTEM_PATH) or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(state: Path) -> Registry:
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = state / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {state / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    log = (state / "registry.log").open("wb")
    process = subprocess.Popen([program(), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    registry = Registry(f"127.0.0.1:{port}", process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://{registry.address}/v2/", timeout=1) as answer:
                if answer.status == 200:
                    return registry
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            registry.stop()
            raise RuntimeError(
                f"docker-registry did not answer on {registry.address}: see {state / 'registry.log'}"
            )
        time.sleep(0.1)
