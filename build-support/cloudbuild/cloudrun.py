"""The Cloud Run behind the `gcloud` of the steps: the local Cloud Run (cloudrun.platform), plus what only
gcloud's side has: IAM bindings (recorded: instances check ID tokens themselves, AUTH_ALLOWED_CALLERS),
every command recorded (record.jsonl), the services kept between builds (services.json), images pulled from
the local registry as Cloud Run pulls them.

Revisions run from their images (cloudrun.runners.from_image, Cloud Run's flags, host network), or from
source when no engine is given (the stand-in's own tests). Services and tags are reached as on Cloud Run, by
their `https://[TAG---]SERVICE-NUMBER.REGION.run.app` URLs on the front end, whose traffic splits are real:
a step reaches them with the environment `step_env()` gives it (the development CA, MESH_CONNECT_TO).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloudrun import runners
from cloudrun.frontend import Target
from cloudrun.manifest import parse
from cloudrun.platform import CloudRun as Platform
from cloudrun.platform import CloudRunError
from engine.daemon import Engine

__all__ = ["CloudRun", "CloudRunError"]
REGION = "europe-west1"


@dataclass
class CloudRun:
    state: Path
    project_number: str
    say: Callable[[str], None]
    record_to: Path | None = None  # where the record goes (default: STATE/record.jsonl)
    engine: Engine | None = None  # None: revisions run from source, nothing pulled
    region: str = REGION
    bindings: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # service -> (member, role)

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.state.mkdir(parents=True, exist_ok=True)
        runner: Callable[[runners.Revision], runners.Launcher] = runners.from_source
        if self.engine is not None:
            runner = functools.partial(runners.from_image, docker_env=self.engine.docker_env())
        self.platform = Platform(
            self.state, project_number=self.project_number, region=self.region, runner=runner, say=self.say
        )
        self.identity = self.platform.identity
        self.record_file: Path = self.record_to or self.state / "record.jsonl"
        self.services_file = self.state / "services.json"
        if self.services_file.exists():
            self._restore(json.loads(self.services_file.read_text()))

    def step_env(self) -> dict[str, str]:
        """What a build step needs to call the services by their URLs: the front end's CA, and the front end
        as the address of every `*.run.app` name (mesh.settings' MESH_CONNECT_TO; deploy.smoke reads it too).
        """
        return {
            "TLS_CA_FILE": str(self.platform.ca_file),
            "MESH_CONNECT_TO": f".run.app={self.platform.front.address}",
        }

    # -- what gcloud asks ------------------------------------------------------------------------------------
    def record(self, command: str, **details: Any) -> None:
        with self.lock, self.record_file.open("a") as out:
            out.write(json.dumps({"command": command, **details}) + "\n")

    def replace(self, text: str, region: str) -> list[str]:
        spec = parse(text)
        with self.lock:
            self._region(spec.region or region)
            self._region(region)
            if self.engine is not None:  # from the local registry, as Cloud Run pulls
                self.engine.docker("pull", spec.image, timeout=300)
            name = self.platform.replace(text)
            self.bindings.setdefault(spec.service, set())
            traffic = self.platform.traffic(spec.service)
            self.record("run services replace", service=spec.service, revision=name, image=spec.image,
                        traffic=[asdict(t) for t in traffic])  # fmt: skip
            percent = sum(t.percent for t in traffic if t.revision == name)
            return [
                f"Service [{spec.service}] revision [{name}] has been deployed and is serving {percent} percent of traffic.",
                *self._traffic_lines(spec.service),
            ]

    def update_traffic(self, name: str, changes: Mapping[str, Any]) -> list[str]:
        with self.lock:
            traffic = self.platform.update_traffic(name, **changes)
            # With the calls each revision has answered so far: what went where, through the front end.
            self.record("run services update-traffic", service=name, traffic=[asdict(t) for t in traffic],
                        served=self.platform.served(name))  # fmt: skip
            return self._traffic_lines(name)

    def add_binding(self, name: str, member: str, role: str) -> str:
        """Recorded only: the revisions check ID tokens themselves (AUTH_ALLOWED_CALLERS)."""
        with self.lock:
            bindings = self._bindings(name)
            _check_binding(member, role)
            bindings.add((member, role))
            self.record("run services add-iam-policy-binding", service=name, member=member, role=role)
            return f"Updated IAM policy for service [{name}]."

    def remove_binding(self, name: str, member: str, role: str) -> str:
        with self.lock:
            bindings = self._bindings(name)
            _check_binding(member, role)
            if (member, role) not in bindings:
                raise CloudRunError(
                    "Policy binding with the specified principal, role, and condition not found!"
                )
            bindings.remove((member, role))
            self.record("run services remove-iam-policy-binding", service=name, member=member, role=role)
            return f"Updated IAM policy for service [{name}]."

    def iam_policy(self, name: str) -> dict[str, Any]:
        """`gcloud run services get-iam-policy --format=json`: the bindings by role, members sorted."""
        with self.lock:
            bindings = self._bindings(name)
            self.record("run services get-iam-policy", service=name)
            roles = sorted({role for _, role in bindings})
            listed = [
                {"members": sorted(m for m, r in bindings if r == role), "role": role} for role in roles
            ]
            return {**({"bindings": listed} if listed else {}), "etag": "ACAB", "version": 1}

    def describe(self, name: str) -> dict[str, Any]:
        with self.lock:
            self.record("run services describe", service=name)
            return self.platform.describe(name)

    def identity_token(self, audience: str, account: str) -> str:
        with self.lock:
            self.identity.add_account(account)
            self.record("auth print-identity-token", audience=audience, account=account)
            return self.identity.mint(account, audience)

    def save(self) -> None:
        """The services as a project keeps them between builds: region, traffic and the revisions it names."""
        saved = []
        for service in self.platform.services():
            saved.append({
                "name": service, "region": self.region, "latest": self.platform.latest(service),
                "traffic": [asdict(t) for t in self.platform.traffic(service)],
                "revisions": self.platform.manifests(service),
                "bindings": sorted(self.bindings.get(service, ())),
            })  # fmt: skip
        self.services_file.write_text(json.dumps(saved, indent=1))

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        # In the order they were first deployed (callees first), so callers find their upstreams serving; the
        # images were pulled by the build that deployed them.
        for entry in saved:
            self._region(entry["region"])
            traffic = [Target(**t) for t in entry["traffic"]]
            self.platform.restore(entry["name"], entry["revisions"], traffic, entry["latest"])
            self.bindings[entry["name"]] = {(member, role) for member, role in entry.get("bindings", [])}

    def close(self) -> None:
        self.save()
        self.platform.close()

    # -- how ------------------------------------------------------------------------------------------------
    def _region(self, region: str) -> None:
        if region != self.region:
            raise CloudRunError(f"region {region} is not served here: the local Cloud Run runs {self.region}")

    def _bindings(self, name: str) -> set[tuple[str, str]]:
        """The service's IAM policy (every deployed service has one, empty at first)."""
        if name not in self.bindings:
            raise CloudRunError(f"Cannot find service [{name}]")
        return self.bindings[name]

    def _traffic_lines(self, service: str) -> list[str]:
        lines = [f"Service URL: {self.platform.url(service)}"]
        for target in self.platform.traffic(service):
            tag = f" (tag {target.tag}: {self.platform.url(service, target.tag)})" if target.tag else ""
            lines.append(f"  {target.percent:3d}% {target.revision}{tag}")
        return lines


def _check_binding(member: str, role: str) -> None:
    if not re.fullmatch(
        r"(serviceAccount|user|group):[^@\s]+@[^@\s]+|allUsers|allAuthenticatedUsers", member
    ):
        raise CloudRunError(f"Invalid member [{member}]")
    if not re.fullmatch(r"roles/[a-zA-Z.]+", role):
        raise CloudRunError(f"Invalid role [{role}]")
