"""One child process, supervised: spawned with an environment, its output read line by line, ready when it
logs its JSON "serving" line (one per worker), stopped with SIGTERM and, past a bound, SIGKILL.

The local mesh (localmesh.processes), the reliability suite and the benchmarks build their processes on it,
each adding its own: a prefixed echo, kept lines and /proc usage, core pinning and CPU time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class StartError(RuntimeError):
    """A process did not come up; the message holds its own last lines of output."""


class Supervised:
    """`argv` run with exactly `env`; every output line (stdout and stderr) goes to `on_line` and the last
    `tail` are kept for a StartError. Ready once `servers` processes of it (its workers) logged "serving"."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        on_line: Callable[[str], None] | None = None,
        servers: int = 1,
        tail: int = 40,
        **spawn: Any,  # for asyncio.create_subprocess_exec: start_new_session, preexec_fn
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.tail: deque[str] = deque(maxlen=tail)
        self.port = 0
        self.started_at = 0.0  # perf_counter at spawn
        self.ready_at = 0.0  # perf_counter at the last "serving" line it waited for
        self._on_line = on_line
        self._servers = servers
        self._serving_lines = 0
        self._spawn = spawn
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def start(self, timeout: float) -> int:
        """Spawn and wait until it serves; its port. StartError (after stopping it) if it exits first or does
        not serve within `timeout` seconds."""
        serving: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started_at = time.perf_counter()
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            **self._spawn,
        )
        self._pump = asyncio.create_task(self._read(self._process, serving))
        exited = asyncio.create_task(self._process.wait())
        done, _ = await asyncio.wait([serving, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if serving in done:
            self.port = serving.result()
            return self.port
        serving.cancel()
        await self.stop(5.0)
        why = f"exited with status {self.returncode}" if done else f"did not serve within {timeout:.0f} s"
        output = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        raise StartError(f"{self.name} {why}; its output:\n{output}")

    async def _read(self, process: asyncio.subprocess.Process, serving: asyncio.Future[int]) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:  # read to the end, so the child never blocks on a full pipe
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self._on_line is not None:
                self._on_line(line)
            if not serving.done() and line.startswith("{"):
                port = _serving_port(line)
                if port is not None:
                    self._serving_lines += 1
                    if self._serving_lines >= self._servers:
                        self.ready_at = time.perf_counter()
                        serving.set_result(port)

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def wait(self, timeout: float) -> int:
        """Its exit status, once it has exited (within `timeout`) and its output is read."""
        assert self._process is not None
        code = await asyncio.wait_for(self._process.wait(), timeout)
        await self._drained()
        return code

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status (None if never
        started)."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        await self._drained()
        return process.returncode

    async def _drained(self) -> None:
        if self._pump is not None:
            await asyncio.wait([self._pump], timeout=5)


def _serving_port(line: str) -> int | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and entry.get("event") == "serving" and isinstance(entry.get("port"), int):
        return int(entry["port"])
    return None
