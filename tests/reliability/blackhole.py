"""A TCP listener that accepts connections and never answers: a hung instance, or a black-holed address,
as a caller sees it (the connection is made; no HTTP/2 SETTINGS, no reply, ever)."""

from __future__ import annotations

import asyncio
from types import TracebackType


class BlackHole:
    """`async with BlackHole() as hole:` listens on 127.0.0.1:`hole.port` until the block ends."""

    MAX_HELD = (
        64  # connections kept open at once; beyond that they are closed (callers reconnect with backoff)
    )

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> BlackHole:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if len(self._held) >= self.MAX_HELD:
            writer.close()
            return
        self._held.append(writer)  # read nothing, write nothing: the client's bytes sit in the socket buffer

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._held:
            writer.close()
        await self._server.wait_closed()
