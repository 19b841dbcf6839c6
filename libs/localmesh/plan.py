"""What the local mesh runs, read from the manifests that deploy: each `services/<folder>/service*.yaml`
rendered by deploy/render.py for a local project (no VPC: every service `ingress: all`, guarded by its
allow-list), with services/invokers.yaml's topology. Nothing here restates who runs or who calls whom:

- the services, and the folder (source and image) each runs: the manifests and deploy/layout.py;
- the order they start in, callees first: each manifest's upstream addresses (`SERVICE-NUMBER.REGION.run.app`);
- the accounts the identity emulator holds: each manifest's serviceAccountName, and the developer, the one
  invoker of services/invokers.yaml that no service runs as (mesh-client: the identity of outside callers);
- each service's audience: its AUTH_AUDIENCE (https://SERVICE-NUMBER.REGION.run.app).

Images are named by digest, as render.py requires: from source `mesh.local/<folder>@sha256:<hash of the
folder's files>`, so the digest says which source runs; from images the local image's ID (see launcher.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import services
from cloudrun import names
from cloudrun.manifest import RevisionSpec, parse
from deploy.layout import INVOKERS_FILE, SERVICES_DIR, cloud_run_name, deployable_services, manifests
from deploy.reach import Topology
from deploy.render import render_manifest

# The local project the manifests are rendered for (values of the shapes render.py checks).
PROJECT_ID = "local-mesh"
PROJECT_NUMBER = "100000000001"
REGION = "europe-west1"
REGISTRY = "mesh.local"  # source references: never pulled, the digest names the source


class PlanError(ValueError):
    """The manifests do not make a mesh (an unknown service, no outside identity...); one line."""


@dataclass(frozen=True)
class Service:
    name: str  # the Cloud Run service (metadata.name)
    folder: str  # services/<folder>: its source, its image
    manifest: str  # rendered, as `gcloud run services replace` gets it
    spec: RevisionSpec
    upstreams: tuple[str, ...]  # the services it calls

    @property
    def host(self) -> str:
        return names.service_host(self.name, PROJECT_NUMBER, REGION)

    @property
    def audience(self) -> str:
        return self.spec.env.get("AUTH_AUDIENCE", f"https://{self.host}")


def find_root(start: Path | None = None) -> Path:
    """The repository whose manifests the mesh runs: the current directory or one above it (`./pants run`
    runs in the repository), else the one the service packages are imported from."""
    here = (start or Path.cwd()).absolute()
    for candidate in [here, *here.parents, Path(services.__file__).absolute().parent.parent]:
        if (candidate / INVOKERS_FILE).is_file():
            return candidate
    raise PlanError(f"no {INVOKERS_FILE} in {here} or above: run the mesh in the repository")


def templates(root: Path) -> dict[str, tuple[str, Path]]:
    """Cloud Run service -> (folder, its manifest), as deploy/layout.py finds them."""
    return {
        cloud_run_name(path): (folder, path)
        for folder in deployable_services(root)
        for path in manifests(root, folder)
    }


def source_image(root: Path, folder: str) -> str:
    """`mesh.local/<folder>@sha256:<hash of services/<folder>'s files, names and contents>`."""
    digest = hashlib.sha256()
    base = root / SERVICES_DIR / folder
    for path in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{REGISTRY}/{folder}@sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class Plan:
    services: tuple[Service, ...]  # in start order: callees first
    developer: str  # the outside callers' account (email)

    @classmethod
    def load(cls, root: Path, images: Mapping[str, str], only: Sequence[str] = ()) -> Plan:
        """The mesh from the manifests under `root`; `images`: folder -> image by digest (all by default);
        `only`: these services and what they call."""
        topology = Topology.load((root / INVOKERS_FILE).read_text())
        values = {"PROJECT_ID": PROJECT_ID, "PROJECT_NUMBER": PROJECT_NUMBER, "REGION": REGION}
        rendered: dict[str, tuple[str, str, RevisionSpec]] = {}
        for name, (folder, path) in templates(root).items():
            text = render_manifest(path.read_text(), {**values, "IMAGE": images[folder]}, topology, None)
            rendered[name] = (folder, text, parse(text))
        hosts = {names.service_host(n, PROJECT_NUMBER, REGION): n for n in rendered}
        upstreams = {
            name: tuple(
                sorted({hosts[h] for v in spec.env.values() if (h := v.removesuffix(":443")) in hosts})
            )
            for name, (_, _, spec) in rendered.items()
        }
        unknown = sorted(set(only) - set(rendered))
        if unknown:
            raise PlanError(
                f"no manifest for {', '.join(unknown)}; the services are {', '.join(sorted(rendered))}"
            )
        order = _callees_first(upstreams, list(only) or sorted(rendered))
        services = tuple(
            Service(n, rendered[n][0], rendered[n][1], rendered[n][2], upstreams[n]) for n in order
        )
        accounts = {spec.service_account.split("@")[0] for _, _, spec in rendered.values()}
        outside = sorted({i for ids in topology.invokers.values() for i in ids} - accounts)
        if len(outside) != 1:
            raise PlanError(
                f"{INVOKERS_FILE} names {outside or 'no'} invoker(s) that no service runs as; the local mesh's "
                "developer is the one identity of outside callers (mesh-client)"
            )
        return cls(services, f"{outside[0]}@{PROJECT_ID}.iam.gserviceaccount.com")

    def __getitem__(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def invokers(self, service: str) -> list[str]:
        """Who `service` admits (its AUTH_ALLOWED_CALLERS, which tests/deploy holds to invokers.yaml)."""
        return [c for c in self[service].spec.env.get("AUTH_ALLOWED_CALLERS", "").split(",") if c]


def _callees_first(upstreams: Mapping[str, Sequence[str]], wanted: Sequence[str]) -> list[str]:
    """`wanted` and what they call, each after everything it calls (a cycle is a PlanError)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise PlanError(f"the manifests' upstreams form a cycle through {name}")
        visiting.add(name)
        for upstream in upstreams[name]:
            visit(upstream)
        visiting.discard(name)
        order.append(name)

    for name in sorted(wanted):
        visit(name)
    return order
