"""Server processes under test: spawned pinned to a core, ready when they log their port, measured from /proc."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from localmesh.supervisor import Supervised

_PR_SET_PDEATHSIG = 1
_TICKS = os.sysconf("SC_CLK_TCK")
# The cores this process may use before the harness pins itself (children inherit its affinity).
_ALL_CORES = frozenset(os.sched_getaffinity(0))


def python_path() -> str:
    """This interpreter's import path, so children import what the harness imports (source tree or PEX)."""
    return os.pathsep.join(p for p in sys.path if p)


def cores() -> tuple[int | None, int | None]:
    """(server core, load-generator core) when there are two or more; (None, None) otherwise."""
    available = sorted(os.sched_getaffinity(0))
    return (available[0], available[1]) if len(available) >= 2 else (None, None)


def pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def unpin() -> None:
    """This process, and the processes it starts from now on, back on every core."""
    os.sched_setaffinity(0, _ALL_CORES)


class Server:
    """One server process (localmesh.supervisor) pinned to `core`; `async with Server(...)` starts it and
    always stops it. Ready once every worker of a multi-process instance serves."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], core: int | None) -> None:
        self.name = name
        self.workers = int(env.get("WORKER_PROCESSES", "1"))

        def child_setup() -> None:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # no orphans if the harness dies
            pin(core)

        self._process = Supervised(
            name, argv, {"PORT": "0", **env}, servers=self.workers, tail=30, preexec_fn=child_setup
        )

    @property
    def port(self) -> int:
        return self._process.port

    @property
    def started_at(self) -> float:
        """perf_counter at spawn."""
        return self._process.started_at

    @property
    def ready_at(self) -> float:
        """perf_counter when its last worker logged that it serves."""
        return self._process.ready_at

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 60.0) -> int:
        return await self._process.start(timeout)

    @property
    def pid(self) -> int:
        return self._process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) in kB."""
        found: dict[str, int] = {"VmRSS": 0, "VmHWM": 0}
        for pid in [self.pid, *_children(self.pid)]:  # summed over the workers, if any
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in found:
                        found[key] += int(value.split()[0])
        return found

    async def stop(self) -> None:
        await self._process.stop(15.0)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process and its workers (its child processes) have used so far."""
    return sum(_cpu_seconds(one) for one in [pid, *_children(pid)])


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found
