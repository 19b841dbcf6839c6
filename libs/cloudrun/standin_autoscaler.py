"""STAND-IN, deleted at merge: the autoscaler's contract (HELPERS.md, issue 25) until `cloudrun.autoscaler` and
FrontEnd.set_revision(concurrency=...) land from their own branch. It runs a revision's instances at a fixed
count (max(1, minScale)) and announces them with the front end's set_endpoints; it scales nothing.

At merge: in platform.py and runners.py, import Autoscaler, Instance, Launcher, Scaling, StartupFailed from
cloudrun.autoscaler and FrontEnd from cloudrun.frontend instead, and delete this file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloudrun import frontend


@dataclass(frozen=True)
class Scaling:
    concurrency: int = 80
    min_instances: int = 1
    max_instances: int = 100
    target: float = 0.6
    idle_s: float = 2.0


class Instance(Protocol):
    @property
    def port(self) -> int: ...

    def stop(self) -> int | None: ...

    def kill(self) -> None: ...

    def alive(self) -> bool: ...


Launcher = Callable[[], Instance]


class StartupFailed(Exception):
    pass


@dataclass(frozen=True)
class InstanceState:
    port: int
    in_flight: int
    draining: bool


class FrontEnd(frontend.FrontEnd):
    """set_revision with the contract's `concurrency` (not enforced by this stand-in)."""

    def __init__(self, cert: Path, key: Path, **kwargs: Any) -> None:
        super().__init__(cert, key, **kwargs)

    def set_revision(  # type: ignore[override]
        self, revision: str, *, timeout_s: float = 300.0, concurrency: int = 80, wait: bool = True
    ) -> None:
        super().set_revision(revision, timeout_s=timeout_s, wait=wait)


class Autoscaler:
    def __init__(
        self,
        front: frontend.FrontEnd,
        revision: str,
        launch: Launcher,
        scaling: Scaling,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._front, self._revision, self._launch, self._scaling = front, revision, launch, scaling
        self._instances: list[Instance] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for _ in range(max(1, self._scaling.min_instances)):
            started = self._launch()
            with self._lock:
                self._instances.append(started)
        self._announce()

    def set_scaling(self, min_instances: int | None = None, max_instances: int | None = None) -> None:
        pass

    def instances(self) -> list[InstanceState]:
        with self._lock:
            return [InstanceState(i.port, 0, False) for i in self._instances]

    def stop(self) -> None:
        with self._lock:
            stopping, self._instances = self._instances, []
        self._announce()
        for instance in stopping:
            instance.stop()

    def kill(self, port: int) -> None:
        with self._lock:
            for instance in self._instances:
                if instance.port == port:
                    instance.kill()

    def _announce(self) -> None:
        with self._lock:
            ports = [i.port for i in self._instances]
        self._front.set_endpoints(self._revision, ports)
