"""One instance, every vCPU: WORKER_PROCESSES copies of a service's process serving one port.

A Python process runs its gRPC handlers on one core, and Cloud Run bills every vCPU of an instance. With
WORKER_PROCESSES above 1, the process that Cloud Run starts becomes the instance's supervisor: it reserves the
port, starts that many workers (the same command line, so each is a complete server: health, auth, tracing)
that share the port through SO_REUSEPORT, and owns their lifetime:

- SIGTERM (or SIGINT) is passed to every worker; each turns NOT_SERVING and drains as a lone process does
  (after its lame duck, on SIGTERM), and the instance exits 0 once all have, inside Cloud Run's 10 s.
- A worker that exits on its own ends the instance: the others are stopped and the supervisor exits with the
  worker's status (1 if it was killed), so Cloud Run replaces the instance. A restart in place would hide a
  crash loop from Cloud Run's health and from the logs' error rate.

The supervisor runs no gRPC: it only forks, waits and forwards signals. The default worker count is the CPU
quota of the container's cgroup (what Cloud Run's `cpu` limit becomes), 1 where there is none or it cannot be
read; port sharing happens only in this mode, so a lone process still refuses a port that is taken.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mesh.settings import ALL_INTERFACES, WORKER_INDEX_VARIABLE, ConfigError, Env, integer, ip_literal

WORKERS_VARIABLE = "WORKER_PROCESSES"
MAX_WORKERS = 64
_SUPERVISOR = "MESH_SUPERVISOR_PID"  # the supervisor's pid, for the worker's PR_SET_PDEATHSIG check
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("mesh.workers")


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Whole CPUs the container may use (rounded up), from cgroup v2's cpu.max or v1's CFS quota; 1 when the
    quota is unlimited or unreadable."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            v1 = cgroup / "cpu"
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return 1
    try:
        share = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return 1  # "max" (no limit), or -1 (v1: no limit)
    return max(1, min(MAX_WORKERS, math.ceil(share))) if share > 0 else 1


def worker_count(env: Env, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """WORKER_PROCESSES, or the cgroup's CPU quota when it is unset."""
    return integer(env, WORKERS_VARIABLE, cpu_quota(cgroup), low=1, high=MAX_WORKERS)


def worker_index(env: Env) -> int | None:
    """This process's worker number when a supervisor started it, else None."""
    raw = env.get(WORKER_INDEX_VARIABLE)
    return int(raw) if raw is not None and raw.isdigit() else None


def become_worker(env: Env) -> None:
    """In a worker: end with the supervisor, however it ends (a SIGKILL included)."""
    supervisor = int(env.get(_SUPERVISOR, "0") or 0)
    if supervisor and not die_with_parent(supervisor):
        raise SystemExit("the instance's supervisor is gone; not starting")


def command_of(main_module: str | None) -> list[str]:
    """The command line that runs the service's main module again (for its workers)."""
    if main_module:
        return [sys.executable, "-m", main_module]
    return list(sys.orig_argv)


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, never listening socket on `host`:`port` (where the workers listen) with SO_REUSEPORT: it fixes
    the port (PORT=0 picks one) for the workers, and fails at once, with one line, if another process holds
    the port."""
    reserved = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError as error:
        reserved.close()
        raise ConfigError(f"PORT={port}: cannot bind ({error.strerror}); set PORT to a free port") from None
    return reserved


def die_with_parent(expected_parent: int) -> bool:
    """Ask the kernel for SIGTERM when the parent process dies (PR_SET_PDEATHSIG), so that nothing outlives
    the process that started it; False if `expected_parent` is already gone (this process was orphaned before
    the request took effect)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == expected_parent


def supervise(argv: Sequence[str], count: int, env: Mapping[str, str], shutdown_seconds: float) -> int:
    """Run `count` workers (`argv`: the service's own command) on PORT until a signal or a worker's exit;
    returns the instance's exit status. A worker still running `shutdown_seconds` (its lame duck and grace)
    after the signal, and a second, is killed."""
    # Held open (bound, never listening, so it takes no connections) while the instance lives: between a
    # worker's exit and the instance's, no other process can take the port.
    reserved = _reserve(
        ip_literal(env, "BIND_HOST", ALL_INTERFACES), integer(env, "PORT", 8080, low=0, high=65535)
    )
    port = reserved.getsockname()[1]
    stopping: int | None = None  # the signal to pass on

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [
        subprocess.Popen(
            argv,
            env={**env, "PORT": str(port), WORKER_INDEX_VARIABLE: str(index), _SUPERVISOR: str(os.getpid())},
            # Their own group: a terminal's Ctrl-C reaches the supervisor only, which stops each worker once.
            start_new_session=True,
        )
        for index in range(count)
    ]
    log.info(
        "supervising %d workers on port %d (pids %s)", count, port, ", ".join(str(w.pid) for w in workers)
    )
    status = 0
    try:
        while stopping is None:
            ended = next((w for w in workers if w.poll() is not None), None)
            if ended is not None:
                status = ended.returncode if ended.returncode > 0 else 1
                log.error(
                    "worker %d (pid %d) exited with status %d; stopping the instance so that it is replaced",
                    workers.index(ended),
                    ended.pid,
                    ended.returncode,
                )
                break
            time.sleep(0.05)
    finally:
        codes = _stop(workers, shutdown_seconds + 1.0, stopping or signal.SIGTERM)
        reserved.close()
    failed = [code for code in codes if code != 0]
    if status == 0 and failed:
        status = failed[0] if failed[0] > 0 else 1
    log.info("instance stopped; worker exit codes %s", codes)
    return status


def _stop(workers: list[subprocess.Popen[bytes]], timeout: float, signum: int) -> list[int]:
    """`signum` to each running worker (each drains: SIGINT skips the lame duck), SIGKILL to any still running
    after `timeout`."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signum)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return [worker.returncode for worker in workers]
