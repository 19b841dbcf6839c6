"""Cloud Run on one machine: Knative services deployed from their manifests behind the front end.

    with CloudRun(certs_dir, project_number="123", region="europe-west1", runner=runners.from_source) as run:
        run.replace(rendered_manifest)                       # a revision, serving once its probe passes
        run.update_traffic("ping", to_revisions={"ping-00002-abc": 10})
        run.describe("ping")["status"]["url"]                # https://ping-123.europe-west1.run.app

`CloudRun` owns the front end (Envoy), the identity emulator (Google's metadata server and signing keys, unless
one is given) and, per running revision, an autoscaler that starts its instances with the runner (from source
or from images: cloudrun.runners). A revision's traffic and tags come from the manifest's `traffic:` block
(none: 100% to the latest) and from update_traffic, which moves traffic with gcloud's semantics.

What each instance is given, as Cloud Run gives it: K_SERVICE/K_REVISION/K_CONFIGURATION, the manifest's env,
its service account's tokens (the identity emulator as its metadata server, AUTH_CERTS_URL its keys),
TLS_CA_FILE (the development CA, which signed the front end's certificate) and MESH_CONNECT_TO (`.run.app=`
the front end), so the manifests' upstream names (SERVICE-NUMBER.REGION.run.app:443) reach the front end.
Cloud Trace and Cloud Monitoring are not emulated: their exporters are off (a runner's extra_env can send them
elsewhere). A revision left with neither traffic nor a tag is scaled to zero (its instances stopped, its
manifest kept); traffic sent back to it starts it again, as a cold start on Cloud Run.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cloudrun import names
from cloudrun.autoscaler import Autoscaler, Launcher, Scaling, StartupFailed
from cloudrun.frontend import FrontEnd, Target
from cloudrun.manifest import RevisionSpec, parse
from cloudrun.runners import Revision
from emulators.dev_ca import ensure_dev_certs
from emulators.identity import IdentityEmulator

Runner = Callable[[Revision], Launcher]  # e.g. runners.from_source, or a partial of runners.from_image


class CloudRunError(Exception):
    """What the Admin API (and so gcloud) answers with; the message is gcloud's."""


@dataclass
class RevisionState:
    name: str
    spec: RevisionSpec
    manifest: str  # what replace was given
    scaler: Autoscaler | None = None  # None: scaled to zero


@dataclass
class ServiceState:
    name: str
    revisions: dict[str, RevisionState] = field(default_factory=dict)
    traffic: list[Target] = field(default_factory=list)
    latest: str = ""


@dataclass(frozen=True)
class Row:
    """One revision in the live table."""

    service: str
    revision: str
    percent: int
    tags: tuple[str, ...]
    instances: int
    in_flight: int


class CloudRun:
    def __init__(
        self,
        state_dir: Path,
        *,
        project_number: str,
        region: str,
        runner: Runner,
        identity: IdentityEmulator | None = None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        """`state_dir`: the development CA (made there on first use) and what instances may read of it."""
        self.project_number, self.region, self._runner, self._say = project_number, region, runner, say
        self._lock = threading.RLock()
        self._services: dict[str, ServiceState] = {}
        self._counter = itertools.count(1)
        certs = ensure_dev_certs(state_dir / "certs", [names.wildcard(region)])
        # Only the CA's certificate, in a folder of its own: what a container may have mounted.
        self._public = Path(tempfile.mkdtemp(prefix="cloudrun-ca-"))
        self._public.chmod(0o755)
        self.ca_file = self._public / "ca.crt"
        shutil.copyfile(certs.ca_cert, self.ca_file)
        self.ca_file.chmod(0o644)
        self._own_identity = identity is None
        self.identity = identity or IdentityEmulator()
        self.front = FrontEnd(
            certs.server_cert, certs.server_key, project_number=project_number, region=region
        )
        try:
            if self._own_identity:
                self.identity.start()
            self.front.start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CloudRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Every instance stopped (out of the front end first), then the front end and the emulator."""
        with self._lock:
            for service in self._services.values():
                for revision in service.revisions.values():
                    self._scale_to_zero(revision, forget=False)
            self._services.clear()
        self.front.stop()
        if self._own_identity:
            self.identity.stop()
        shutil.rmtree(self._public, ignore_errors=True)

    # -- deploying -------------------------------------------------------------------------------------------
    def replace(self, text: str) -> str:
        """`gcloud run services replace`: the manifest's revision started (CloudRunError if its startup probe
        never passes: it then gets no traffic) and the service's traffic set from its `traffic:` block."""
        spec = parse(text)
        with self._lock:
            if spec.region and spec.region != self.region:
                raise CloudRunError(f"the manifest's location {spec.region} is not --region={self.region}")
            service = self._services.get(spec.service) or ServiceState(spec.service)
            name = spec.revision or f"{spec.service}-{next(self._counter):05d}-{uuid.uuid4().hex[:3]}"
            if name in service.revisions:
                raise CloudRunError(f"Revision named '{name}' with different configuration already exists.")
            traffic = [
                Target(
                    name if t.revision in (None, name) else self._revision(service, t.revision),
                    t.percent,
                    t.tag,
                )
                for t in spec.traffic
            ] or [Target(name, 100)]
            revision = RevisionState(name, spec, text)
            self._start(revision)
            service.revisions[name] = revision
            service.latest = name
            self._services[spec.service] = service
            self._apply(service, traffic)
            return name

    def restore(
        self, service: str, manifests: Mapping[str, str], traffic: Sequence[Target], latest: str
    ) -> None:
        """A service as a project kept it between builds: its revisions (by name: their manifests), traffic."""
        with self._lock:
            state = ServiceState(service, latest=latest)
            for name, text in manifests.items():
                state.revisions[name] = RevisionState(name, parse(text), text)
            self._services[service] = state
            self._apply(state, list(traffic))

    def update_traffic(
        self,
        service: str,
        *,
        to_revisions: Mapping[str, int] | None = None,
        to_tags: Mapping[str, int] | None = None,
        to_latest: bool = False,
        update_tags: Mapping[str, str] | None = None,
        remove_tags: Sequence[str] = (),
    ) -> list[Target]:
        """`gcloud run services update-traffic`: the revisions (or tags) named get their percent, the others
        share what is left in proportion to what they had; tags moved or removed. The new traffic."""
        with self._lock:
            state = self._get(service)
            routes = {t.revision: t.percent for t in state.traffic if t.percent}
            tags = {t.tag: t.revision for t in state.traffic if t.tag}
            for tag in remove_tags:
                tags.pop(tag, None)
            for tag, revision in (update_tags or {}).items():
                tags[tag] = self._revision(state, revision)
            targets = dict(to_revisions or {})
            for tag, percent in (to_tags or {}).items():
                if tag not in tags:
                    raise CloudRunError(f"tag {tag!r} is not on any revision of {service}")
                targets[tags[tag]] = percent
            if to_latest:
                targets = {state.latest: 100}
            if targets:
                targets = {self._revision(state, r): p for r, p in targets.items()}
                given = sum(targets.values())
                if given > 100:
                    raise CloudRunError("the traffic percentages add up to more than 100")
                rest = {r: p for r, p in routes.items() if r not in targets}
                if given < 100 and not rest:
                    raise CloudRunError("the traffic percentages must add up to 100")
                # Cloud Run scales the revisions left out down proportionally to fill what the targets leave.
                left, total = 100 - given, sum(rest.values())
                scaled = {r: p * left // total for r, p in rest.items()} if total else {}
                if scaled:
                    scaled[max(scaled, key=lambda r: rest[r])] += left - sum(scaled.values())
                routes = {**scaled, **targets}
            self._apply(state, _layout(state, routes, tags))
            return list(state.traffic)

    def set_scaling(
        self, service: str, min_instances: int | None = None, max_instances: int | None = None
    ) -> None:
        """The service's running revisions held between these counts (locally: `./pants run :mesh` options)."""
        with self._lock:
            for revision in self._get(service).revisions.values():
                if revision.scaler is not None:
                    revision.scaler.set_scaling(min_instances=min_instances, max_instances=max_instances)

    # -- what it serves ---------------------------------------------------------------------------------------
    def services(self) -> list[str]:
        with self._lock:
            return list(self._services)

    def traffic(self, service: str) -> list[Target]:
        with self._lock:
            return list(self._get(service).traffic)

    def manifests(self, service: str) -> dict[str, str]:
        """The manifests of the revisions the service's traffic names (what a project keeps between builds)."""
        with self._lock:
            state = self._get(service)
            named = {t.revision for t in state.traffic}
            return {n: r.manifest for n, r in state.revisions.items() if n in named}

    def latest(self, service: str) -> str:
        with self._lock:
            return self._get(service).latest

    def url(self, service: str, tag: str | None = None) -> str:
        """The service's (or its tag's) https URL, on the front end: e.g. https://ping-123.europe-west1.run.app"""
        return f"https://{self.front.host(service, tag)}"

    def describe(self, service: str) -> dict[str, Any]:
        """The fields of `gcloud run services describe --format=json` the pipeline reads."""
        with self._lock:
            state = self._get(service)
            return {
                "apiVersion": "serving.knative.dev/v1",
                "kind": "Service",
                "metadata": {"name": service, "labels": {"cloud.googleapis.com/location": self.region}},
                "status": {
                    "url": self.url(service),
                    "latestCreatedRevisionName": state.latest,
                    "latestReadyRevisionName": state.latest,
                    "traffic": [
                        {
                            "revisionName": t.revision,
                            "percent": t.percent,
                            **({"tag": t.tag, "url": self.url(service, t.tag)} if t.tag else {}),
                        }
                        for t in state.traffic
                    ],
                },
            }

    def served(self, service: str) -> dict[str, int]:
        """Calls each running revision of the service has answered through the front end (Envoy's counters)."""
        with self._lock:
            running = [n for n, r in self._get(service).revisions.items() if r.scaler is not None]
        counters = self.front.stats(r"^cluster\.[^.]+\.upstream_rq_completed$")
        return {n: counters.get(f"cluster.{n}.upstream_rq_completed", 0) for n in running}

    def snapshot(self) -> list[Row]:
        """Each revision of each service: its share, tags, instances and calls in flight (a live table)."""
        rows = []
        with self._lock:
            for service in self._services.values():
                for name, revision in service.revisions.items():
                    instances = revision.scaler.instances() if revision.scaler else []
                    rows.append(
                        Row(
                            service.name,
                            name,
                            sum(t.percent for t in service.traffic if t.revision == name),
                            tuple(t.tag for t in service.traffic if t.revision == name and t.tag),
                            len(instances),
                            sum(i.in_flight for i in instances),
                        )
                    )
        return rows

    # -- how -------------------------------------------------------------------------------------------------
    def _get(self, service: str) -> ServiceState:
        if service not in self._services:
            raise CloudRunError(f"Cannot find service [{service}]")
        return self._services[service]

    def _revision(self, service: ServiceState, name: str) -> str:
        if name == "LATEST":
            return service.latest
        if name not in service.revisions:
            raise CloudRunError(f"Revision [{name}] of service [{service.name}] does not exist")
        return name

    def _apply(self, service: ServiceState, traffic: list[Target]) -> None:
        """The revisions the traffic names running (started first), the front end routing by it, then the ones
        it no longer names scaled to zero. A target with neither percent nor tag is dropped, as Cloud Run does.
        """
        traffic = [t for t in traffic if t.percent or t.tag]
        named = {t.revision for t in traffic}
        for name in sorted(named):
            if service.revisions[name].scaler is None:
                self._start(service.revisions[name])
        self.front.set_service(service.name, traffic)
        service.traffic = traffic
        for name, revision in service.revisions.items():
            if name not in named:
                self._scale_to_zero(revision)

    def _start(self, revision: RevisionState) -> None:
        spec = revision.spec
        self.front.set_revision(revision.name, timeout_s=spec.timeout_s, concurrency=spec.concurrency)
        launcher = self._runner(Revision(spec, revision.name, self._instance_env(spec, revision.name)))
        scaling = Scaling(
            concurrency=spec.concurrency, min_instances=spec.min_scale, max_instances=spec.max_scale
        )
        scaler = Autoscaler(self.front, revision.name, launcher, scaling)
        try:
            scaler.start()
        except StartupFailed as failure:
            scaler.stop()
            self.front.remove_revision(revision.name)
            raise CloudRunError(str(failure)) from None
        revision.scaler = scaler
        self._say(f"cloud run: {spec.service} revision {revision.name} serving ({spec.image})")

    def _scale_to_zero(self, revision: RevisionState, *, forget: bool = True) -> None:
        if revision.scaler is not None:
            revision.scaler.stop()  # out of the front end's endpoints first, then SIGTERM
            revision.scaler = None
            if forget:
                self.front.remove_revision(revision.name)

    def _instance_env(self, spec: RevisionSpec, revision: str) -> dict[str, str]:
        account = spec.service_account or f"{self.project_number}-compute@developer.gserviceaccount.com"
        return {
            **spec.env,
            # Cloud Trace and Cloud Monitoring are not emulated.
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "K_SERVICE": spec.service,
            "K_REVISION": revision,
            "K_CONFIGURATION": spec.service,
            "TLS_CA_FILE": str(self.ca_file),
            "MESH_CONNECT_TO": f".run.app={self.front.address}",
            "AUTH_CERTS_URL": self.identity.certs_url,
            **self.identity.env_for(account),
        }


def _layout(service: ServiceState, percents: Mapping[str, int], tags: Mapping[str, str]) -> list[Target]:
    """Traffic targets as Cloud Run lists them: one per tag (the first carries the revision's percent), and
    one untagged target for a revision with traffic and no tag."""
    targets = []
    for revision in service.revisions:
        percent = percents.get(revision, 0)
        named = [tag for tag, tagged in tags.items() if tagged == revision]
        if percent and not named:
            targets.append(Target(revision, percent))
        targets.extend(Target(revision, percent if i == 0 else 0, tag) for i, tag in enumerate(named))
    return targets
