"""Debian packages for the engine tooling, installed with apt-get when this is a root Debian machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# dpkg needs ldconfig and start-stop-daemon on PATH; a Pants test sandbox may pass no PATH at all.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def system_env() -> dict[str, str]:
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{path}:{SYSTEM_PATH}" if path else SYSTEM_PATH}


def can_install() -> str | None:
    """None when apt-get can install here, else why not (one phrase)."""
    if os.geteuid() != 0:
        return "not root"
    if not Path("/etc/debian_version").is_file():
        return "not Debian"
    if not any(Path(d, "apt-get").is_file() for d in SYSTEM_PATH.split(":")):
        return "no apt-get"
    return None


def _apt(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**system_env(), "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *argv], env=env, capture_output=True, text=True, check=False)


def _known(package: str) -> bool:
    env = system_env()
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package], env=env, capture_output=True, check=False
    )
    return shown.returncode == 0


def install(packages: list[str]) -> None:
    """apt-get install, with an `apt-get update` first when the lists do not know a package, and once more
    when the install fails on stale lists (a fresh machine's lists may be missing or old)."""
    argv = ["install", "-y", "--no-install-recommends", *packages]
    updated = False
    if not all(_known(p) for p in packages):
        _check(_apt("update"), "apt-get update")
        updated = True
    result = _apt(*argv)
    if result.returncode != 0 and not updated:
        _check(_apt("update"), "apt-get update")
        result = _apt(*argv)
    _check(result, "apt-get install " + " ".join(packages))


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} failed: " + " | ".join(tail))
