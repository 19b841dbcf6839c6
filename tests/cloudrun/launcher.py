"""A Launcher for the autoscaler (cloudrun.autoscaler) that starts in-process instances of a real service
(its `build`, as `python -m services.X.main` would run it, h2c on a free loopback port) on an asyncio loop of
their own, in a thread: the autoscaler is a sync library and calls its launcher from its own threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cloudrun.autoscaler import StartupFailed
from mesh import serving
from mesh.testing import running

START_WITHIN_S = 20.0
STOP_WITHIN_S = 20.0


class InProcess:
    """One instance: `stop()` drains it as SIGTERM would (no lame duck: the front end was told first);
    `kill()` ends it at once, open calls cut, as SIGKILL would. `in_flight_at_stop` is what the instance itself
    counted in its handlers when it was told to stop (the autoscaler's order says: nothing)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        service: str,
        build: serving.ServiceFactory,
        env: Mapping[str, str],
    ) -> None:
        self._loop = loop
        self._stop = asyncio.Event()
        self._server: serving.RunningServer | None = None
        self._killed = False
        self.in_flight_at_stop: int | None = None
        ready: concurrent.futures.Future[serving.RunningServer] = concurrent.futures.Future()
        self._task = asyncio.run_coroutine_threadsafe(self._serve(service, build, env, ready), loop)
        try:
            self._server = ready.result(START_WITHIN_S)
        except Exception as error:  # noqa: BLE001 (a build that raised, or no start in time)
            raise StartupFailed(f"{service} did not start: {error!r}") from error

    async def _serve(
        self,
        service: str,
        build: serving.ServiceFactory,
        env: Mapping[str, str],
        ready: concurrent.futures.Future[serving.RunningServer],
    ) -> None:
        try:
            async with running(service, build, env) as server:
                ready.set_result(server)
                await self._stop.wait()
        except BaseException as error:
            if not ready.done():
                ready.set_exception(error)
            raise

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def stop(self) -> int | None:
        assert self._server is not None
        drain = self._server.drain
        if self.in_flight_at_stop is None:
            self.in_flight_at_stop = drain.in_flight if drain is not None else 0
        self._loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(Exception):
            self._task.result(STOP_WITHIN_S)
        return 137 if self._killed else 0

    def kill(self) -> None:
        assert self._server is not None
        self._killed = True
        asyncio.run_coroutine_threadsafe(
            self._server.model.stop(self._server.server, None), self._loop
        ).result(STOP_WITHIN_S)

    def alive(self) -> bool:
        return not self._killed and not self._task.done()


@dataclass
class Launcher:
    """Starts instances of `service` (`build`, `env`) on `loop`; remembers every one it started."""

    loop: asyncio.AbstractEventLoop
    service: str
    build: serving.ServiceFactory
    env: Mapping[str, str]
    started: list[InProcess] = field(default_factory=list)

    def __call__(self) -> InProcess:
        instance = InProcess(self.loop, self.service, self.build, self.env)
        self.started.append(instance)
        return instance


@contextlib.contextmanager
def instance_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio loop in a thread of its own for the block: the instances' loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="instances", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_WITHIN_S)
        loop.close()
