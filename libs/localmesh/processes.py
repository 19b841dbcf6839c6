"""Service processes of the local mesh: started, watched until they serve, logged with a prefix, stopped.

Each child runs through localmesh.child, which sets PR_SET_PDEATHSIG, so it dies with the launcher even if the
launcher is killed outright: no orphans. A child that exits before serving is reported with its own output.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from localmesh import child

COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


class StartError(RuntimeError):
    """A service did not come up; the message holds its own last lines of output."""


class ServiceProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        colour: str = "",
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = dict(env)
        self._prefix = f"{colour}{name:<13}{RESET if colour else ''}|"
        self._echo = echo
        self._tail: deque[str] = deque(maxlen=40)
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._serving: asyncio.Future[int] | None = None
        self.port = 0

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def start(self, port: int = 0, timeout: float = 30.0) -> int:
        """Start the process and wait until it serves; returns its port."""
        self._serving = asyncio.get_running_loop().create_future()
        self._process = await asyncio.create_subprocess_exec(
            *self._argv,
            env={**self._env, "PORT": str(port)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: Ctrl-C in the terminal reaches the launcher only, which then stops each
            # service once, in order; a service signalled twice would die mid-drain.
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._read_output())
        exited = asyncio.create_task(self._process.wait())
        done, _ = await asyncio.wait(
            [self._serving, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self._serving in done:
            exited.cancel()
            self.port = self._serving.result()
            return self.port
        exited.cancel()
        await self.stop()
        if self._pump:
            await asyncio.wait([self._pump], timeout=2)
        why = f"exited with status {self.returncode}" if done else f"did not serve within {timeout:.0f} s"
        output = "\n".join(f"    {line}" for line in self._tail) or "    (no output)"
        raise StartError(f"{self.name} {why}; its output:\n{output}")

    async def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for raw in self._process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            message = self._parse(line)
            if self._echo:
                self._echo(f"{self._prefix} {message}")

    def _parse(self, line: str) -> str:
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        if not isinstance(entry, dict):
            return line
        if entry.get("event") == "serving" and self._serving and not self._serving.done():
            self._serving.set_result(int(entry["port"]))
        return f"{entry.get('severity', ''):<7} {entry.get('message', '')}"

    async def stop(self, timeout: float = 12.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` (beyond the service's own grace)."""
        process = self._process
        if process is None or process.returncode is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        if self._pump:
            await asyncio.wait([self._pump], timeout=2)
        return process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()


def python_module(module: str) -> list[str]:
    """argv that runs `module` with this interpreter and this process's import path, tied to this process."""
    return [sys.executable, "-m", child.__name__, str(os.getpid()), module]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "GCE_METADATA", "GRPC_PING", "AUTH_"))
    }
    # Absolute, so that what runs with it elsewhere (the mesh's CLI script, in another shell) imports the same.
    base["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    return {**base, **extra}
