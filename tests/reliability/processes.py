"""Service processes under test: started with an environment, every stdout line kept, measured from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from localmesh.processes import child_env, python_module

MODULES = {
    "ping": "services.ping.main",
    "routeguide": "services.routeguide.main",
    "aggregator": "services.aggregator.main",
}


class StartError(RuntimeError):
    pass


@dataclass(frozen=True)
class Usage:
    """What the kernel says a process holds."""

    rss_kb: int
    threads: int
    fds: int


class Service:
    """One service process (python -m services.NAME.main), tied to this process by PR_SET_PDEATHSIG.

    Every line it prints is kept in `lines` (JSON log lines: the logs tests scan for secrets).
    """

    def __init__(self, name: str, env: Mapping[str, str], *, kind: str | None = None) -> None:
        self.name = name
        self.module = MODULES[kind or name]
        self.env = {"K_SERVICE": name, **env}
        self.lines: list[str] = []
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

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
        serving: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._process = await asyncio.create_subprocess_exec(
            *python_module(self.module),
            env=child_env({**self.env, "PORT": str(port)}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._pump = asyncio.create_task(self._read(self._process, serving))
        exited = asyncio.create_task(self._process.wait())
        done, _ = await asyncio.wait([serving, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if serving not in done:
            self.kill()
            await self.wait(5)
            raise StartError(f"{self.name} did not serve; its output:\n" + "\n".join(self.lines[-30:]))
        self.port = serving.result()
        return self

    async def _read(self, process: asyncio.subprocess.Process, serving: asyncio.Future[int]) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if not serving.done():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("event") == "serving":
                    serving.set_result(int(entry["port"]))

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
        assert self._process is not None
        self._process.send_signal(signum)

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def wait(self, timeout: float) -> int:
        assert self._process is not None
        code = await asyncio.wait_for(self._process.wait(), timeout)
        if self._pump is not None:
            await asyncio.wait([self._pump], timeout=2)
        return code

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL past `timeout`); the exit code."""
        if self._process is None:
            return None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except asyncio.TimeoutError:
                self._process.kill()
        return await self.wait(5)

    def usage(self) -> Usage:
        return usage(self.pid)


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
    )
