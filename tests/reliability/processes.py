"""Service processes under test (localmesh.supervisor): started with an environment, every output line kept,
measured from /proc."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from localmesh.processes import child_env, python_module
from localmesh.supervisor import Supervised
from tests.bench.processes import cpu_seconds

MODULES = {
    "ping": "services.ping.main",
    "routeguide": "services.routeguide.main",
    "aggregator": "services.aggregator.main",
}


@dataclass(frozen=True)
class Usage:
    """What the kernel says a process holds."""

    rss_kb: int
    threads: int
    fds: int
    cpu_seconds: float  # user + system, all threads (and its workers, if any), since the start


class Service:
    """One service process (python -m services.NAME.main), tied to this process by PR_SET_PDEATHSIG.

    Every line it prints is kept in `lines` (JSON log lines: the logs tests scan for secrets).
    """

    def __init__(self, name: str, env: Mapping[str, str], *, kind: str | None = None) -> None:
        self.name = name
        self.module = MODULES[kind or name]
        # No K_SERVICE unless a test gives it: it says "on Cloud Run", where verification settings are required.
        self.env = dict(env)
        self.lines: list[str] = []
        self.port = 0
        self._process: Supervised | None = None

    @property
    def _started(self) -> Supervised:
        assert self._process is not None
        return self._process

    @property
    def pid(self) -> int:
        return self._started.pid

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0, timeout: float = 30.0) -> Service:
        """Started and serving (StartError, from localmesh.supervisor, if it does not serve)."""
        env = child_env({**self.env, "PORT": str(port)})
        self._process = Supervised(self.name, python_module(self.module), env, on_line=self.lines.append)
        self.port = await self._process.start(timeout)
        return self

    def messages(self) -> list[str]:
        """The `message` of every JSON log line printed so far."""
        found = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(str(entry.get("message", "")))
        return found

    def signal(self, signum: int) -> None:
        self._started.signal(signum)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    async def wait(self, timeout: float) -> int:
        return await self._started.wait(timeout)

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL past `timeout`); the exit code."""
        return None if self._process is None else await self._process.stop(timeout)

    def usage(self) -> Usage:
        return usage(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU it (and its workers, if any) has used so far."""
        return cpu_seconds(self.pid)


async def kill_all(services: list[Service]) -> None:
    """SIGKILL (which also ends a process stopped by SIGSTOP) and reap, for a test's teardown."""
    for service in services:
        service.kill()
        if service.returncode is None and service.started:
            await service.wait(10)


def usage(pid: int) -> Usage:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return Usage(
        rss_kb=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=cpu_seconds(pid),
    )
