"""Cloud Run's autoscaler, locally: one revision's instances, added and removed by concurrency.

A thread polls the front end (every POLL_S) for each instance's calls and streams in flight. Instances wanted:
ceil(in flight / (target × containerConcurrency)), within [minScale, maxScale]. Scale-out launches instances
off the polling thread and announces each once its launcher returns (its startup probe passed). Scale-in marks
the excess instances with the least in flight DRAINING (no new call; open calls and streams go on), and
removes one only once it has had nothing in flight for `idle_s`, in Cloud Run's order: out of the front end's
endpoints, then `Instance.stop()` (SIGTERM, the instance's own drain). When load rises again a draining
instance is taken back before a new one is launched. At maxScale with every slot busy, the front end refuses
what would wait (429, gRPC UNAVAILABLE) as Cloud Run does; below it, a call waits in the front end's queue.
An instance that died is taken out of the endpoints at once and replaced up to minScale.

Scale to zero (min_instances 0): Envoy cannot queue a call for a revision with no instance, so the first call
after the last instance went away is answered UNAVAILABLE (callers retry it) and wakes one instance up. That
is why the local default minScale is 1.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cloudrun.frontend import FrontEnd

POLL_S = 0.1
# A launch that failed is not tried again before this: a revision that never serves does not spin.
RETRY_LAUNCH_S = 1.0

log = logging.getLogger(__name__)


class StartupFailed(Exception):
    """An instance never served (its startup probe did not pass); the message says why."""


@dataclass(frozen=True)
class Scaling:
    concurrency: int = 80  # containerConcurrency: each instance's cap
    min_instances: int = 1  # autoscaling.knative.dev/minScale (locally 1 by default: see the module's note)
    max_instances: int = 100  # autoscaling.knative.dev/maxScale
    target: float = 0.6  # scale out past this share of the cap in flight per instance (Cloud Run's 60%)
    idle_s: float = 2.0  # a draining instance is removed once it had nothing in flight this long


class Instance(Protocol):
    @property
    def port(self) -> int: ...

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; the exit code."""

    def kill(self) -> None:
        """SIGKILL."""

    def alive(self) -> bool: ...


Launcher = Callable[[], Instance]  # starts ONE instance; returns once its startup probe passed


@dataclass(frozen=True)
class InstanceState:
    port: int
    in_flight: int
    draining: bool


@dataclass
class _Running:
    instance: Instance
    in_flight: int = 0
    draining: bool = False
    busy_at: float = 0.0  # when it last had something in flight (or began draining)


class Autoscaler:
    def __init__(
        self,
        front: FrontEnd,
        revision: str,
        launch: Launcher,
        scaling: Scaling = Scaling(),
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """The revision must be known to `front` (`set_revision`) with `scaling.concurrency` as its cap."""
        _check(scaling)
        self.front, self.revision, self._launch, self._scaling = front, revision, launch, scaling
        self._on_change = on_change or (lambda: None)
        self._lock = threading.RLock()
        self._running: dict[int, _Running] = {}
        self._launching = 0
        self._failed_at = -math.inf
        self._wanted: collections.deque[tuple[float, int]] = collections.deque()
        self._none_healthy = 0
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        self._launchers: list[threading.Thread] = []

    # -- lifetime ----------------------------------------------------------------------------------------------
    def start(self) -> Autoscaler:
        """max(1, minScale) instances launched and announced (so even a revision with minScale 0 proves its
        startup probe), then the polling thread. StartupFailed if one never serves (none is left running)."""
        count = max(1, self._scaling.min_instances)
        started: list[Instance] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                instance = self._launch()
            except BaseException as error:  # noqa: B036 (reported below, with the others')
                errors.append(error)
            else:
                started.append(instance)

        threads = [threading.Thread(target=one, name=f"launch-{self.revision}") for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            for instance in started:
                instance.stop()
            if isinstance(errors[0], StartupFailed):
                raise errors[0]
            raise StartupFailed(f"revision {self.revision}: {errors[0]}") from errors[0]
        with self._lock:
            now = time.monotonic()
            for instance in started:
                self._running[instance.port] = _Running(instance, busy_at=now)
            self._announce()
        self._on_change()
        self._poller = threading.Thread(target=self._poll, name=f"autoscaler-{self.revision}", daemon=True)
        self._poller.start()
        return self

    def stop(self) -> None:
        """Every instance out of the endpoints first, then stopped (each drains). Idempotent."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()
        for thread in list(self._launchers):
            thread.join()  # a launch under way ends; its instance is stopped as it arrives
        with self._lock:
            leaving = [r.instance for r in self._running.values()]
            self._running.clear()
            if leaving:
                self._announce()
        _stop_all(leaving)
        if leaving:
            self._on_change()

    # -- what it holds ---------------------------------------------------------------------------------------------
    def instances(self) -> list[InstanceState]:
        with self._lock:
            return [InstanceState(p, r.in_flight, r.draining) for p, r in sorted(self._running.items())]

    def set_scaling(self, min_instances: int | None = None, max_instances: int | None = None) -> None:
        """New bounds, applied from the next poll."""
        with self._lock:
            changed = dataclasses.replace(
                self._scaling,
                min_instances=self._scaling.min_instances if min_instances is None else min_instances,
                max_instances=self._scaling.max_instances if max_instances is None else max_instances,
            )
            _check(changed)
            self._scaling = changed

    def kill(self, port: int) -> None:
        """SIGKILL of one instance (tests: an instance that dies); the poll notices and replaces it."""
        with self._lock:
            self._running[port].instance.kill()

    # -- the polling thread ---------------------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stopping.wait(POLL_S):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 (Envoy busy or restarting: the next poll tries again)
                log.exception("autoscaler %s: poll failed", self.revision)

    def _tick(self) -> None:
        load = self.front.load(self.revision)
        in_flight, pending, none_healthy = load.in_flight, load.pending, load.none_healthy
        changed = False
        with self._lock:
            now, scaling = time.monotonic(), self._scaling
            dead = []
            for port, running in list(self._running.items()):
                if not running.instance.alive():
                    del self._running[port]  # died: out of the endpoints now (no caller is sent to it)
                    dead.append(running.instance)
                    continue
                running.in_flight = in_flight.get(port, 0)
                if running.in_flight:
                    running.busy_at = now
            serving = [r for r in self._running.values() if not r.draining]
            wanted, steady = self._wanted_now(now, sum(in_flight.values()) + pending, none_healthy, scaling)
            if wanted > len(serving) + self._launching:
                changed |= self._scale_out(wanted - len(serving) - self._launching, now)
            elif steady < len(serving) and not self._launching:
                for running in sorted(serving, key=lambda r: r.in_flight)[: len(serving) - steady]:
                    running.draining, running.busy_at = True, now
                    changed = True
            leaving = dead + [
                r.instance
                for r in self._running.values()
                if r.draining and not r.in_flight and now - r.busy_at >= scaling.idle_s
            ]
            for instance in leaving[len(dead) :]:
                del self._running[instance.port]
            if changed or leaving:
                self._announce()  # Cloud Run's order: out of the endpoints (applied) first, then SIGTERM
            serving = [r for r in self._running.values() if not r.draining]
            full = bool(serving) and all(r.in_flight >= scaling.concurrency for r in serving)
            self.front.set_refusing(
                self.revision, full and len(serving) >= scaling.max_instances and not self._launching
            )
        if changed or leaving:
            self._on_change()
        if leaving:
            threading.Thread(target=_stop_all, args=(leaving,), name=f"stop-{self.revision}").start()

    def _wanted_now(self, now: float, in_flight: int, none_healthy: int, scaling: Scaling) -> tuple[int, int]:
        """Instances wanted for what is in flight now (to scale out), and the most wanted over the last idle
        period (to scale in: a dip between two calls is no reason to drain)."""
        wanted = math.ceil(in_flight / (scaling.target * scaling.concurrency))
        if none_healthy > self._none_healthy:
            wanted = max(wanted, 1)  # scaled to zero and called: wake one up
        self._none_healthy = none_healthy
        wanted = min(max(wanted, scaling.min_instances), scaling.max_instances)
        self._wanted.append((now, wanted))
        while self._wanted and now - self._wanted[0][0] > scaling.idle_s:
            self._wanted.popleft()
        return wanted, max(w for _, w in self._wanted)

    def _scale_out(self, more: int, now: float) -> bool:
        # A draining instance is taken back before a new one is launched: it is warm and connected.
        changed = False
        for running in sorted(self._running.values(), key=lambda r: -r.in_flight):
            if more and running.draining:
                running.draining, running.busy_at, more, changed = False, now, more - 1, True
        if more and now - self._failed_at >= RETRY_LAUNCH_S and not self._stopping.is_set():
            self._launching += more
            for _ in range(more):
                thread = threading.Thread(target=self._launch_one, name=f"launch-{self.revision}")
                self._launchers = [t for t in self._launchers if t.is_alive()] + [thread]
                thread.start()
        return changed

    def _launch_one(self) -> None:
        try:
            instance = self._launch()
        except Exception as error:  # noqa: BLE001 (StartupFailed or the launcher's own: logged, retried)
            log.warning("autoscaler %s: an instance did not start: %s", self.revision, error)
            with self._lock:
                self._launching -= 1
                self._failed_at = time.monotonic()
            return
        with self._lock:
            self._launching -= 1
            if self._stopping.is_set():
                keep = False
            else:
                self._running[instance.port] = _Running(instance, busy_at=time.monotonic())
                self._announce()
                keep = True
        if keep:
            self._on_change()
        else:
            instance.stop()

    def _announce(self) -> None:
        ports = sorted(self._running)
        draining = [p for p in ports if self._running[p].draining]
        self.front.set_endpoints(self.revision, ports, draining=draining)


def _check(scaling: Scaling) -> None:
    if scaling.concurrency < 1 or not 0 < scaling.target <= 1 or scaling.idle_s < 0:
        raise ValueError(f"{scaling}: concurrency >= 1, 0 < target <= 1 and idle_s >= 0 are needed")
    if not 0 <= scaling.min_instances <= scaling.max_instances or scaling.max_instances < 1:
        raise ValueError(f"{scaling}: 0 <= min_instances <= max_instances and max_instances >= 1 are needed")


def _stop_all(instances: list[Instance]) -> None:
    """Stopped at once (each drains on its own), returned when all have ended."""
    threads = [threading.Thread(target=i.stop, name=f"stop-{i.port}") for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
