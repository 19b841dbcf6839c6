"""For the CLI's tests: run main(argv) the way a shell would, while the servers under test keep serving."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.cli.main import main

if TYPE_CHECKING:
    import pytest


@dataclass(frozen=True)
class Outcome:
    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def cli(capsys: pytest.CaptureFixture[str], port: int, *argv: str, plaintext: bool = True) -> Outcome:
    """`cli --server 127.0.0.1:PORT [--insecure] ARGV...`, on a thread: main() runs its own event loop and the
    servers answer on this one meanwhile. For arguments that parse; bad ones are tested on main() directly."""
    capsys.readouterr()  # start from nothing
    flags = ["--server", f"127.0.0.1:{port}", *(["--insecure"] if plaintext else [])]
    status = await asyncio.to_thread(main, [*flags, *argv])
    captured = capsys.readouterr()
    return Outcome(status, captured.out, captured.err)
