"""How an instance of a revision is started: from source (`python -m services.<folder>.main`, the default:
fast) or from its image (`docker run` with Cloud Run's flags). Either way it runs the production way: h2c on
its own free `$PORT` on loopback, no `TLS_CERT_FILE`, with the environment the platform gives it
(`Revision.env`: K_SERVICE/K_REVISION/K_CONFIGURATION, the manifest's env, its metadata server...).

`from_source(revision)` and `from_image(revision, docker_env)` return a Launcher: a callable that starts one
instance and returns it once its startup probe (grpc.health Check of the manifest's probe service, over h2c)
answers SERVING, or raises StartupFailed with the instance's last lines of output.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudrun.autoscaler import Launcher, StartupFailed
from cloudrun.child import child_env, python_module
from cloudrun.manifest import RevisionSpec

__all__ = ["CLOUD_RUN_FLAGS", "Launcher", "Process", "Revision", "from_image", "from_source", "instance_env"]

LOOPBACK = "127.0.0.1"
STARTUP_WITHIN_S = 30.0  # the manifests' startup probe: 30 tries, a second apart
# Cloud Run's: SIGTERM, then SIGKILL 10 s later; and a little for the process to be reaped.
STOP_WITHIN_S = 10.0
REAPED_WITHIN_S = 5.0
# Cloud Run's contract, as flags: the image's own non-root user, a read-only root with a writable /tmp, no
# capabilities, no privilege gain, 512 MiB and one CPU. --network=host: a private engine has no bridge.
CLOUD_RUN_FLAGS = (
    "--network=host",
    "--read-only",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--memory=512m",
    "--cpus=1",
)
SERVING = health_pb2.HealthCheckResponse.SERVING

# PR_SET_PDEATHSIG (cloudrun.child) fires when the *thread* that spawned an instance ends, not its process, and
# launchers run on threads that end (the autoscaler's): every instance is spawned from this long-lived thread.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cloudrun-spawn")

Lines = Callable[[str, str], None]  # (revision, one line of an instance's output)
ExtraEnv = Callable[[RevisionSpec], Mapping[str, str]]  # e.g. the local mesh's OTLP receiver


@dataclass(frozen=True)
class Revision:
    """What an instance is started from: the revision, and what the platform gives its instances."""

    spec: RevisionSpec
    name: str
    env: Mapping[str, str]  # all but PORT and BIND_HOST, which each instance gets of its own


class Process:
    """One instance: a child process (for an image, the `docker run` in the foreground that stands for the
    container), its output read line by line; the Instance of cloudrun.autoscaler."""

    def __init__(
        self,
        name: str,
        port: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_line: Callable[[str], None] | None,
        kill_argv: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._port = port
        self._kill_argv, self._env = list(kill_argv), dict(env)
        self.tail: collections.deque[str] = collections.deque(maxlen=10)
        # Its own session: a Ctrl-C in the terminal reaches its owner only, which stops each instance once.
        self._process = _SPAWNER.submit(
            subprocess.Popen,
            list(argv),
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ).result()
        self._reader = threading.Thread(target=self._read, args=(on_line,), daemon=True)
        self._reader.start()

    @property
    def port(self) -> int:
        return self._port

    def _read(self, on_line: Callable[[str], None] | None) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:  # to the end, so the instance never blocks on a full pipe
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if on_line is not None:
                on_line(line)

    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (docker passes it on to the container), then SIGKILL past Cloud Run's 10 s; the exit status."""
        if self.alive():
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._reaped()

    def kill(self) -> None:
        if self._kill_argv:  # a container outlives a killed `docker run`: kill the container itself
            subprocess.run(self._kill_argv, env=self._env, capture_output=True, check=False, timeout=30)
        if self.alive():
            self._process.kill()

    def _reaped(self) -> int | None:
        try:
            code = self._process.wait(REAPED_WITHIN_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        self._reader.join(REAPED_WITHIN_S)
        return code


def from_source(
    revision: Revision,
    *,
    on_line: Lines | None = None,
    extra_env: ExtraEnv | None = None,
    startup_within_s: float = STARTUP_WITHIN_S,
) -> Launcher:
    """Instances as `python -m services.<folder>.main` with this interpreter and import path, each dying with
    this process (cloudrun.child), the folder named by the image's repository (`.../ping@sha256:..` -> ping).
    """
    module = f"services.{revision.spec.folder.replace('-', '_')}.main"

    def launch() -> Process:
        port = free_port()
        env = child_env(instance_env(revision, port, extra_env))
        started = Process(revision.name, port, python_module(module), env, _lines(revision, on_line))
        return probed(started, revision, startup_within_s)

    return launch


def from_image(
    revision: Revision,
    docker_env: Mapping[str, str],
    *,
    on_line: Lines | None = None,
    extra_env: ExtraEnv | None = None,
    startup_within_s: float = STARTUP_WITHIN_S,
) -> Launcher:
    """Instances as containers of the revision's image (already pulled): `docker run` with Cloud Run's flags on
    the host network (`docker_env`: the docker CLI's environment, e.g. DOCKER_HOST). The folder of
    TLS_CA_FILE is mounted read-only at the same path (it must hold nothing but what instances may read)."""

    def launch() -> Process:
        port = free_port()
        env = instance_env(revision, port, extra_env)
        name = f"cloudrun-{revision.name}-{uuid.uuid4().hex[:6]}"
        mounts = [
            f"--volume={d}:{d}:ro" for d in {os.path.dirname(env["TLS_CA_FILE"])} if "TLS_CA_FILE" in env
        ]
        # Names only: the values (the metadata server's secret among them) come from the CLI's environment.
        argv = ["docker", "run", "--rm", f"--name={name}", *CLOUD_RUN_FLAGS, *mounts,
                *(f"--env={k}" for k in sorted(env)), revision.spec.image]  # fmt: skip
        started = Process(
            revision.name,
            port,
            argv,
            {**docker_env, **env},
            _lines(revision, on_line),
            kill_argv=["docker", "kill", name],
        )
        return probed(started, revision, startup_within_s)

    return launch


def instance_env(revision: Revision, port: int, extra_env: ExtraEnv | None) -> dict[str, str]:
    extra = dict(extra_env(revision.spec)) if extra_env else {}
    return {**revision.env, **extra, "PORT": str(port), "BIND_HOST": LOOPBACK}


def probed(instance: Process, revision: Revision, within_s: float) -> Process:
    """`instance` once grpc.health says its probe service is SERVING; else it is stopped and StartupFailed
    raised, as Cloud Run fails a deploy whose container fails its startup probe."""
    service = revision.spec.probe_service or ""
    deadline = time.monotonic() + within_s
    options = [("grpc.so_reuseport", 0)]
    with grpc.insecure_channel(f"{LOOPBACK}:{instance.port}", options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while instance.alive() and time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == SERVING:
                    return instance
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.1)
    why = "exited" if not instance.alive() else f"did not answer SERVING within {within_s:g} s"
    instance.kill()
    instance.stop()
    tail = " | ".join(instance.tail) or "(no output)"
    raise StartupFailed(
        f"Revision '{revision.name}' is not ready and cannot serve traffic. The user-provided container failed"
        f" the configured startup probe checks (grpc.health {service!r}: it {why}). Logs: {tail}"
    )


def _lines(revision: Revision, on_line: Lines | None) -> Callable[[str], None] | None:
    return None if on_line is None else lambda line: on_line(revision.name, line)


def free_port() -> int:
    """A loopback port free now, for an instance's $PORT (each instance its own, as on Cloud Run)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])
