"""The local mesh's services as containers (`./pants run :mesh -- --containers`): each in its own image, run
the way Cloud Run runs it, on the host's network so that loopback (the identity emulator, the span receiver, the
other services) is what it is for processes.

`docker run` stays in the foreground: its output is the service's, and the SIGTERM the launcher sends it is
passed on to the container (docker's signal proxy), so the service drains and the CLI exits with its status.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from cloudrun.runners import CLOUD_RUN_FLAGS
from emulators.dev_ca import DevCerts

__all__ = ["CLOUD_RUN_FLAGS", "container_certs", "images", "run_argv"]

IMAGE_USER = 10001  # services/Dockerfile's USER
# The image each role of the mesh runs (ping-upstream is the ping image, as on Cloud Run).
IMAGE_OF_ROLE = {
    "ping": "ping",
    "ping-upstream": "ping",
    "routeguide": "routeguide",
    "aggregator": "aggregator",
}


def images(tag: str = "dev") -> dict[str, str]:
    """Role -> image, as `./pants package services/<svc>:image` tags them (NAME:dev)."""
    return {role: f"{image}:{tag}" for role, image in IMAGE_OF_ROLE.items()}


def container_certs(certs: DevCerts, into: Path) -> DevCerts:
    """What a container may read of the development CA: the CA's certificate and the server's certificate and
    key, copied so the image's user can read the key (never the CA's key). Paths in `into`."""
    into = into.absolute()  # the container sees them at the same path
    into.mkdir(parents=True, exist_ok=True)
    copied = DevCerts(into / "ca.crt", certs.ca_key, into / "server.crt", into / "server.key")
    for source, target in ((certs.ca_cert, copied.ca_cert), (certs.server_cert, copied.server_cert)):
        shutil.copyfile(source, target)
        target.chmod(0o644)
    shutil.copyfile(certs.server_key, copied.server_key)
    if os.geteuid() == 0:
        os.chown(copied.server_key, IMAGE_USER, IMAGE_USER)
        copied.server_key.chmod(0o400)
    else:  # a rootless engine maps users differently; the key is the local mesh's own, made on first run
        copied.server_key.chmod(0o644)
    return copied


def run_argv(name: str, image: str, env: Mapping[str, str], mount: Path) -> list[str]:
    """`docker run` for one service: env's names (values from the CLI's own environment, so none is on the
    command line), PORT, and `mount` read-only at the same path."""
    names = sorted({*env, "PORT"})
    return [
        "docker",
        "run",
        "--rm",
        f"--name={name}",
        *CLOUD_RUN_FLAGS,
        *(f"--env={variable}" for variable in names),
        f"--volume={mount}:{mount}:ro",
        image,
    ]
