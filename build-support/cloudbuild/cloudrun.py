"""The Cloud Run stand-in behind the `gcloud` of the steps: services, revisions and traffic, recorded.

A revision is started for real: its image pulled from the local registry and run on the engine the way Cloud
Run runs it (localmesh.containers.CLOUD_RUN_FLAGS, host network, a free PORT, K_SERVICE/K_REVISION), with the
manifest's environment, and held to its gRPC startup probe; a revision that never serves fails the deploy.
What Cloud Run's platform gives a container is emulated on loopback as the container mesh does: TLS with the
development CA (Google's front end), ID tokens from the identity emulator (the metadata server, Google's
signing keys), and `<service>-<project number>.<region>.run.app:443` upstream addresses pointed at the
serving revision of that service. Cloud Trace and Monitoring are not emulated: their exporters are off.

A revision's (and a tag's) URL is its loopback address; a service's URL is that of the revision holding most
of its traffic (percentages are recorded and reported, not split).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cloudbuild.manifest import RevisionSpec, Traffic, parse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator
from engine.daemon import Engine
from localmesh.containers import CLOUD_RUN_FLAGS, container_certs

STARTUP_TIMEOUT_S = 30.0  # the manifests' startup probe: 30 tries, a second apart
SERVING = health_pb2.HealthCheckResponse.SERVING
# Channel options: no port sharing (parallel tests), as mesh.testing.NO_REUSEPORT.
CHANNEL_OPTIONS = (("grpc.so_reuseport", 0),)


class CloudRunError(Exception):
    """What the Admin API (and so gcloud) answers with; the message is gcloud's."""


@dataclass
class Revision:
    name: str
    service: str
    image: str
    port: int
    container: str
    env: dict[str, str]
    manifest: str = ""  # what `replace` was given: a later build with the same state starts it again

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


@dataclass
class Route:
    revision: str
    percent: int
    tag: str | None = None


@dataclass
class Service:
    name: str
    region: str
    revisions: dict[str, Revision] = field(default_factory=dict)
    traffic: list[Route] = field(default_factory=list)
    latest: str = ""
    bindings: set[tuple[str, str]] = field(default_factory=set)

    def serving(self) -> Revision | None:
        live = [r for r in self.traffic if r.percent > 0]
        return self.revisions[max(live, key=lambda r: r.percent).revision] if live else None

    def describe(self) -> dict[str, Any]:
        """The fields of `gcloud run services describe --format=json` the pipeline reads."""
        serving = self.serving()
        return {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": self.name, "labels": {"cloud.googleapis.com/location": self.region}},
            "status": {
                "url": serving.url if serving else "",
                "latestCreatedRevisionName": self.latest,
                "latestReadyRevisionName": self.latest,
                "traffic": [
                    {
                        "revisionName": r.revision,
                        "percent": r.percent,
                        **({"tag": r.tag, "url": self.revisions[r.revision].url} if r.tag else {}),
                    }
                    for r in self.traffic
                ],
            },
        }


@dataclass
class CloudRun:
    engine: Engine
    state: Path
    project_number: str
    say: Callable[[str], None]
    record_to: Path | None = None  # where the record goes (default: STATE/record.jsonl)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.identity = IdentityEmulator().start()
        certs = ensure_dev_certs(self.state / "certs")
        self.ca_cert = certs.ca_cert
        self.served: DevCerts = container_certs(certs, self.state / "container-certs")
        self.record_file: Path = self.record_to or self.state / "record.jsonl"
        self.services_file = self.state / "services.json"
        self._counter = itertools.count(1)
        if self.services_file.exists():
            self._restore(json.loads(self.services_file.read_text()))

    # -- what gcloud asks ------------------------------------------------------------------------------------
    def record(self, command: str, **details: Any) -> None:
        with self.lock, self.record_file.open("a") as out:
            out.write(json.dumps({"command": command, **details}) + "\n")

    def replace(self, text: str, region: str) -> list[str]:
        spec = parse(text)
        with self.lock:
            if spec.region and spec.region != region:
                raise CloudRunError(f"the manifest's location {spec.region} is not --region={region}")
            service = self.services.get(spec.service) or Service(spec.service, region)
            name = spec.revision or f"{spec.service}-{next(self._counter):05d}-{uuid.uuid4().hex[:3]}"
            if name in service.revisions:
                raise CloudRunError(f"Revision named '{name}' with different configuration already exists.")
            traffic = self._routes(service, spec.traffic, new=name)
            revision = self._start(service, spec, name)
            revision.manifest = text
            service.revisions[name] = revision
            service.latest = name
            service.traffic = traffic
            self.services[spec.service] = service
            self.record(
                "run services replace",
                service=spec.service,
                revision=name,
                image=spec.image,
                traffic=[asdict(r) for r in traffic],
            )
            return self._deployed(service, name)

    def update_traffic(self, name: str, changes: Mapping[str, Any]) -> list[str]:
        with self.lock:
            service = self._get(name)
            routes = {r.revision: r.percent for r in service.traffic if r.percent}
            tags = {r.tag: r.revision for r in service.traffic if r.tag}
            for tag in changes.get("remove_tags", []):
                tags.pop(tag, None)
            for tag, revision in changes.get("update_tags", {}).items():
                tags[tag] = self._revision(service, revision)
            targets = dict(changes.get("to_revisions", {}))
            for tag, percent in changes.get("to_tags", {}).items():
                if tag not in tags:
                    raise CloudRunError(f"tag {tag!r} is not on any revision of {name}")
                targets[tags[tag]] = percent
            if changes.get("to_latest"):
                targets = {service.latest: 100}
            if targets:
                targets = {self._revision(service, r): p for r, p in targets.items()}
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
            service.traffic = _layout(service, routes, tags)
            self.record(
                "run services update-traffic", service=name, traffic=[asdict(r) for r in service.traffic]
            )
            return self._traffic_lines(service)

    def add_binding(self, name: str, member: str, role: str) -> str:
        """Recorded only: the stand-in's revisions check ID tokens themselves (AUTH_ALLOWED_CALLERS)."""
        with self.lock:
            service = self._get(name)
            _check_binding(member, role)
            service.bindings.add((member, role))
            self.record("run services add-iam-policy-binding", service=name, member=member, role=role)
            return f"Updated IAM policy for service [{name}]."

    def remove_binding(self, name: str, member: str, role: str) -> str:
        with self.lock:
            service = self._get(name)
            _check_binding(member, role)
            if (member, role) not in service.bindings:
                raise CloudRunError(
                    "Policy binding with the specified principal, role, and condition not found!"
                )
            service.bindings.remove((member, role))
            self.record("run services remove-iam-policy-binding", service=name, member=member, role=role)
            return f"Updated IAM policy for service [{name}]."

    def iam_policy(self, name: str) -> dict[str, Any]:
        """`gcloud run services get-iam-policy --format=json`: the bindings by role, members sorted."""
        with self.lock:
            service = self._get(name)
            self.record("run services get-iam-policy", service=name)
            roles = sorted({role for _, role in service.bindings})
            bindings = [
                {"members": sorted(m for m, r in service.bindings if r == role), "role": role}
                for role in roles
            ]
            return {**({"bindings": bindings} if bindings else {}), "etag": "ACAB", "version": 1}

    def describe(self, name: str) -> dict[str, Any]:
        with self.lock:
            self.record("run services describe", service=name)
            return self._get(name).describe()

    def identity_token(self, audience: str, account: str) -> str:
        with self.lock:
            self.identity.add_account(account)
            self.record("auth print-identity-token", audience=audience, account=account)
            return self.identity.mint(account, audience)

    def save(self) -> None:
        """The services as a project keeps them between builds: region, traffic and the revisions it names."""
        saved = []
        for service in self.services.values():
            named = {r.revision for r in service.traffic}
            saved.append({
                "name": service.name, "region": service.region, "latest": service.latest,
                "traffic": [asdict(r) for r in service.traffic],
                "revisions": {n: r.manifest for n, r in service.revisions.items() if n in named},
                "bindings": sorted(service.bindings),
            })  # fmt: skip
        self.services_file.write_text(json.dumps(saved, indent=1))

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        # In the order they were first deployed (callees first), so callers find their upstreams serving.
        for entry in saved:
            service = Service(entry["name"], entry["region"], latest=entry["latest"])
            service.traffic = [Route(**r) for r in entry["traffic"]]
            service.bindings = {(member, role) for member, role in entry.get("bindings", [])}
            for name, manifest in entry["revisions"].items():
                revision = self._start(service, parse(manifest), name, pull=False)
                revision.manifest = manifest
                service.revisions[name] = revision
            self.services[service.name] = service

    def close(self) -> None:
        self.save()
        for service in self.services.values():
            for revision in service.revisions.values():
                self.engine.docker("rm", "--force", revision.container, check=False)
        self.identity.stop()

    # -- how ------------------------------------------------------------------------------------------------
    def _get(self, name: str) -> Service:
        if name not in self.services:
            raise CloudRunError(f"Cannot find service [{name}]")
        return self.services[name]

    def _revision(self, service: Service, name: str) -> str:
        if name == "LATEST":
            return service.latest
        if name not in service.revisions:
            raise CloudRunError(f"Revision [{name}] of service [{service.name}] does not exist")
        return name

    def _routes(self, service: Service, traffic: tuple[Traffic, ...], new: str) -> list[Route]:
        if not traffic:
            return [Route(new, 100)]
        routes = []
        for target in traffic:
            revision = new if target.revision in (None, new) else self._revision(service, target.revision)
            routes.append(Route(revision, target.percent, target.tag))
        return routes

    def _start(self, service: Service, spec: RevisionSpec, name: str, pull: bool = True) -> Revision:
        if pull:  # from the local registry, as Cloud Run pulls; a restored revision runs the image it pulled
            self.engine.docker("pull", spec.image, timeout=300)
        port = free_port()
        env = {
            **self._platform_env(spec),
            "PORT": str(port),
            "K_SERVICE": spec.service,
            "K_REVISION": name,
            "K_CONFIGURATION": spec.service,
        }
        container = f"cloudrun-{name}-{uuid.uuid4().hex[:6]}"
        mount = self.served.ca_cert.parent
        argv = ["run", "--detach", f"--name={container}", *CLOUD_RUN_FLAGS, f"--volume={mount}:{mount}:ro"]
        # Names only: the values (the metadata server's secret among them) come from the CLI's environment.
        self.engine.docker(*argv, *(f"--env={k}" for k in env), spec.image, env=env)
        revision = Revision(name, spec.service, spec.image, port, container, env)
        try:
            self._wait_ready(revision, spec.probe_service)
        except CloudRunError:
            self.engine.docker("rm", "--force", container, check=False)
            raise
        self.say(f"cloud run: {spec.service} revision {name} serving on {revision.url} ({spec.image})")
        return revision

    def _platform_env(self, spec: RevisionSpec) -> dict[str, str]:
        env = dict(spec.env)
        upstream = re.compile(
            rf"(?P<service>[a-z0-9-]+)-{re.escape(self.project_number)}\.[a-z0-9-]+\.run\.app(:443)?"
        )
        for variable, value in spec.env.items():
            match = upstream.fullmatch(value)
            target = self.services.get(match["service"]) if match else None
            serving = target.serving() if target else None
            if match and serving and variable != "AUTH_AUDIENCE":
                env[variable] = f"localhost:{serving.port}"
                env.setdefault(f"{variable}_AUDIENCE", f"https://{value.removesuffix(':443')}")
        account = spec.service_account or f"{self.project_number}-compute@developer.gserviceaccount.com"
        self.identity.add_account(account)
        return {
            **env,
            "TLS_CERT_FILE": str(self.served.server_cert),
            "TLS_KEY_FILE": str(self.served.server_key),
            "TLS_CA_FILE": str(self.served.ca_cert),
            "AUTH_CERTS_URL": self.identity.certs_url,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            **self.identity.env_for(account),
        }

    def _wait_ready(self, revision: Revision, probe_service: str | None) -> None:
        credentials = grpc.ssl_channel_credentials(self.ca_cert.read_bytes())
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with grpc.secure_channel(
            f"localhost:{revision.port}", credentials, options=CHANNEL_OPTIONS
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service=probe_service or ""), timeout=1
                    )
                    if reply.status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                running = self.engine.docker(
                    "inspect", "--format", "{{.State.Running}}", revision.container, check=False
                )
                if running.stdout.strip() != "true":
                    break
                time.sleep(0.2)
        logs = self.engine.docker("logs", "--tail=5", revision.container, check=False)
        tail = " | ".join((logs.stdout + logs.stderr).strip().splitlines()[-5:])
        raise CloudRunError(
            f"Revision '{revision.name}' is not ready and cannot serve traffic. The user-provided container"
            f" failed the configured startup probe checks. Logs: {tail}"
        )

    def _deployed(self, service: Service, name: str) -> list[str]:
        percent = sum(r.percent for r in service.traffic if r.revision == name)
        return [
            f"Service [{service.name}] revision [{name}] has been deployed and is serving {percent} percent of traffic.",
            *self._traffic_lines(service),
        ]

    def _traffic_lines(self, service: Service) -> list[str]:
        serving = service.serving()
        lines = [f"Service URL: {serving.url if serving else ''}"]
        for route in service.traffic:
            lines.append(
                f"  {route.percent:3d}% {route.revision}"
                + (f" (tag {route.tag}: {service.revisions[route.revision].url})" if route.tag else "")
            )
        return lines


def _layout(service: Service, percents: Mapping[str, int], tags: Mapping[str, str]) -> list[Route]:
    """Traffic targets as Cloud Run lists them: one per tag (the first carries the revision's percent), and
    one untagged target for a revision with traffic and no tag."""
    routes = []
    for revision in service.revisions:
        percent = percents.get(revision, 0)
        named = [tag for tag, tagged in tags.items() if tagged == revision]
        if percent and not named:
            routes.append(Route(revision, percent))
        routes.extend(Route(revision, percent if i == 0 else 0, tag) for i, tag in enumerate(named))
    return routes


def _check_binding(member: str, role: str) -> None:
    if not re.fullmatch(
        r"(serviceAccount|user|group):[^@\s]+@[^@\s]+|allUsers|allAuthenticatedUsers", member
    ):
        raise CloudRunError(f"Invalid member [{member}]")
    if not re.fullmatch(r"roles/[a-zA-Z.]+", role):
        raise CloudRunError(f"Invalid role [{role}]")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
