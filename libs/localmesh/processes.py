"""Service processes of the local mesh: started, watched until they serve, logged with a prefix, stopped.

Each child runs through cloudrun.child, which sets PR_SET_PDEATHSIG, so it dies with the launcher even if the
launcher is killed outright: no orphans. A child that exits before serving is reported with its own output
(localmesh.supervisor.StartError).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from cloudrun.child import child_env, python_module
from localmesh.supervisor import Supervised

__all__ = ["ServiceProcess", "child_env", "python_module"]

COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


class ServiceProcess:
    """One service of the mesh, its output echoed line by line (JSON log lines as severity and message) after
    a coloured prefix with its name."""

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
        self._process: Supervised | None = None
        self.port = 0

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def start(self, port: int = 0, timeout: float = 30.0) -> int:
        """Start the process and wait until it serves; returns its port (StartError if it does not serve)."""
        self._process = Supervised(
            self.name,
            self._argv,
            {**self._env, "PORT": str(port)},
            on_line=None if self._echo is None else self._show,
            # Its own session: Ctrl-C in the terminal reaches the launcher only, which then stops each
            # service once, in order; a service signalled twice would die mid-drain.
            start_new_session=True,
        )
        self.port = await self._process.start(timeout)
        return self.port

    def _show(self, line: str) -> None:
        assert self._echo is not None
        self._echo(f"{self._prefix} {readable(line)}")

    async def stop(self, timeout: float = 12.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` (beyond the service's own grace)."""
        return None if self._process is None else await self._process.stop(timeout)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def signal(self, signum: int) -> None:
        """For tests of faults: e.g. SIGSTOP, a service that stops answering with its connections open."""
        if self._process is not None:
            self._process.signal(signum)


def readable(line: str) -> str:
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict):
        return line
    return f"{entry.get('severity', ''):<7} {entry.get('message', '')}"
