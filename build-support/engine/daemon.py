"""A Docker engine for image builds and tests: the caller's daemon if one answers, else a private dockerd.

Order: DOCKER_HOST if set (it must answer), then the default socket, then this machine's private daemon (state
in ENGINE_STATE_DIR, default ~/.cache/grpc-mesh/engine, shared by every clone and by Pants' test sandboxes,
which cannot see the clone; its images, the base stand-in among them, survive between runs). When none
answers and this is root on Debian, Debian's docker.io is installed and a private dockerd started with host
networking only (no bridge, no iptables: nothing on the machine's network changes). Whoever starts it stops it.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from engine import debian

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class NoEngine(Exception):
    """No engine answers and none can be started; the message is one line saying why."""


@dataclass(frozen=True)
class Engine:
    host: str  # a DOCKER_HOST value
    started: bool  # this process started it, so it stops it
    # A private daemon: it has no bridge network, so BuildKit cannot run RUN steps; builds use the legacy
    # builder, and containers run with --network=host.
    private: bool

    def env(self) -> dict[str, str]:
        """What a docker client (or Pants, through [docker].env_vars) needs to reach this engine."""
        extra = {"DOCKER_BUILDKIT": "0"} if self.private else {}
        return {"DOCKER_HOST": self.host, **extra}

    def docker_env(self) -> dict[str, str]:
        """The environment of a docker client process for this engine."""
        return {**debian.system_env(), **self.env()}

    def docker(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 600,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess:
        """Run the docker CLI against this engine (output captured as text unless redirected); `env` adds to
        the CLI's environment, e.g. the values of `--env=NAME` flags, which keeps secrets off the command line
        (which every local user can read)."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        result = subprocess.run(
            ["docker", *argv],
            env={**self.docker_env(), **(env or {})},
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if check and result.returncode != 0:
            detail = (
                (result.stderr or result.stdout or "").strip().splitlines()[-3:] if kwargs["text"] else []
            )
            raise subprocess.CalledProcessError(result.returncode, ["docker", *argv], " | ".join(detail))
        return result


def state_dir() -> Path:
    configured = os.environ.get("ENGINE_STATE_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "grpc-mesh" / "engine"


def private_host(state: Path) -> str:
    return f"unix://{state / 'docker.sock'}"


def answers(host: str, timeout: float = 2.0) -> bool:
    """The Docker API's GET /_ping answers OK at host (unix:// or tcp://)."""
    url = urlparse(host)
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(url.path)
            conn = http.client.HTTPConnection("localhost", timeout=timeout)
            conn.sock = sock
        elif url.scheme in ("tcp", "http"):
            conn = http.client.HTTPConnection(url.hostname or "localhost", url.port or 2375, timeout=timeout)
        else:
            return False
        conn.request("GET", "/_ping")
        return conn.getresponse().read() == b"OK"
    except OSError:
        return False


def ensure(*, start: bool = True) -> Engine:
    """An engine that answers, or NoEngine. With start=False, only look."""
    given = os.environ.get("DOCKER_HOST")
    if given:
        if answers(given):
            return Engine(given, started=False, private=False)
        raise NoEngine(f"DOCKER_HOST={given} does not answer: start that daemon or unset DOCKER_HOST")
    if answers(DEFAULT_SOCKET):
        return Engine(DEFAULT_SOCKET, started=False, private=False)
    state = state_dir()
    if answers(private_host(state)):
        return Engine(private_host(state), started=False, private=True)
    why_not = debian.can_install()
    if why_not or not start:
        raise NoEngine(
            f"no Docker engine: DOCKER_HOST unset, nothing at {DEFAULT_SOCKET}, and "
            f"{why_not or 'starting one was not asked for'} (a private dockerd needs root on Debian)"
        )
    return _start_private(state)


def _start_private(state: Path) -> Engine:
    state.mkdir(parents=True, exist_ok=True)
    with (state / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two starters at once: the second finds the first's daemon
        host = private_host(state)
        if answers(host):
            return Engine(host, started=False, private=True)
        if not shutil.which("dockerd", path=debian.SYSTEM_PATH):
            debian.install(["docker.io"])
        _clear(state)
        log = (state / "dockerd.log").open("ab")
        subprocess.Popen(
            [
                "dockerd",
                # Host networking only: no bridge, no NAT rules, no iptables changes on the machine.
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-masq=false",
                "--storage-driver=overlay2",
                f"--data-root={state / 'root'}",
                f"--exec-root={state / 'exec'}",
                f"--pidfile={state / 'dockerd.pid'}",
                f"--host={host}",
                "--log-level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=debian.system_env(),
            start_new_session=True,  # outlives the caller's process group (CI's shell, a test session)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(host):
            if time.monotonic() > deadline:
                raise NoEngine(
                    f"dockerd did not answer within {START_TIMEOUT_S:.0f} s; see {state}/dockerd.log"
                )
            time.sleep(0.2)
        return Engine(host, started=True, private=True)


def _pid(state: Path) -> int | None:
    try:
        pid = int((state / "dockerd.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop(state: Path | None = None) -> bool:
    """Stop the private dockerd of state (its containers stop with it), then release what it leaves mounted.
    True when a daemon was running."""
    state = state or state_dir()
    pid = _pid(state)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    _clear(state)
    return pid is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of ours that exited but was not reaped still "exists"; it no longer runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _clear(state: Path) -> None:
    """Unmount what a stopped dockerd leaves under state (its nsfs mount on exec/netns/default), deepest first,
    and drop its stale socket and pid file."""
    prefix = str(state.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", point], env=debian.system_env(), capture_output=True, check=False)
    for name in ("docker.sock", "dockerd.pid"):
        (state / name).unlink(missing_ok=True)
