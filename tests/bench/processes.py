"""Server processes under test: spawned pinned to a core, ready when they log their port, measured from /proc."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1
_TICKS = os.sysconf("SC_CLK_TCK")


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


class Server:
    """One server process; `async with Server(...)` starts it and always stops it."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], core: int | None) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = dict(env)
        self._core = core
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=30)
        self.port = 0
        self.started_at = 0.0  # perf_counter at spawn
        self.ready_at = 0.0  # perf_counter when it logged that it serves
        self.workers = int(self._env.get("WORKER_PROCESSES", "1"))
        self.serving = 0  # "serving" lines seen (one per worker)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 60.0) -> int:
        core = self._core

        def child_setup() -> None:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # no orphans if the harness dies
            pin(core)

        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even after a timeout
        self.started_at = time.perf_counter()
        self._process = await asyncio.create_subprocess_exec(
            *self._argv,
            env={"PORT": "0", **self._env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=child_setup,
        )
        self._pump = asyncio.create_task(self._read(ready))
        try:
            self.port = await asyncio.wait_for(asyncio.shield(ready), timeout)
        except (asyncio.TimeoutError, RuntimeError) as err:
            await self.stop()
            output = "\n".join(self._tail)
            raise RuntimeError(
                f"{self.name} did not serve ({err or 'timeout'}); its output:\n{output}"
            ) from None
        return self.port

    async def _read(self, ready: asyncio.Future[int]) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for raw in self._process.stdout:  # drained to the end, so the child never blocks on a full pipe
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            if not ready.done() and line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "serving" and isinstance(entry.get("port"), int):
                    self.serving += 1
                    if self.serving >= self.workers:  # every worker of a multi-process instance
                        self.ready_at = time.perf_counter()
                        ready.set_result(entry["port"])
        if not ready.done():
            ready.set_exception(RuntimeError("exited"))

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU the process and its workers (its child processes) have used so far."""
        return sum(_cpu_seconds(pid) for pid in [self.pid, *_children(self.pid)])

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
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._pump is not None:
            await asyncio.wait([self._pump], timeout=5)
            self._pump = None


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


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
