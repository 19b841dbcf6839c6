"""Canary rollout of rendered Cloud Run manifests, with gcloud, one service at a time (callees first):

    python canary.pex rollout --project=P --region=R --tag=sha-0a1b2c3 [--traffic-steps=10,50,100] MANIFEST...
    python canary.pex rollback SERVICE --project=P --region=R

For each service: `gcloud run services replace` deploys the new revision (named SERVICE-TAG) with the
traffic still on the serving revision and the new one reachable only through its tag; smoke.check calls it
through the tag's URL (grpc.health, one real call with an ID token of one of its callers, from `gcloud auth
print-identity-token --impersonate-service-account`); then traffic moves to it in the given steps, the tag
is removed and the revision it replaced is tagged `previous`, which `rollback` moves the traffic back to.
A failed smoke test moves no traffic, removes the tag and stops the rollout: exit status 1, with one line
naming the service and the check. A service's first deploy has no revision to keep serving: it takes the
traffic when it becomes ready (Cloud Run's startup probe), and the smoke test still gates what follows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy import smoke

PREVIOUS = "previous"
UPSTREAM = re.compile(r"(?P<service>[a-z0-9-]+)-\d+\.[a-z0-9-]+\.run\.app(:443)?")


class CanaryFailed(Exception):
    pass


@dataclass(frozen=True)
class Release:
    name: str
    manifest: dict[str, Any]

    @property
    def container(self) -> dict[str, Any]:
        return dict(self.manifest["spec"]["template"]["spec"]["containers"][0])

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: str(e.get("value", "")) for e in self.container.get("env", [])}

    @property
    def kind(self) -> str:
        return smoke.KINDS[self.container["startupProbe"]["grpc"]["service"]]

    def upstreams(self) -> set[str]:
        return {m["service"] for v in self.env.values() if (m := UPSTREAM.fullmatch(v))} - {self.name}


def callees_first(releases: Sequence[Release]) -> list[Release]:
    """Every service after the services it calls (among those released), else in the given order."""
    by_name = {r.name: r for r in releases}
    ordered: list[Release] = []

    def visit(release: Release, path: tuple[str, ...]) -> None:
        if release in ordered:
            return
        if release.name in path:
            raise CanaryFailed(f"services call each other in a cycle: {' -> '.join((*path, release.name))}")
        for upstream in sorted(release.upstreams()):
            if upstream in by_name:
                visit(by_name[upstream], (*path, release.name))
        ordered.append(release)

    for release in releases:
        visit(release, ())
    return ordered


@dataclass(frozen=True)
class Gcloud:
    project: str
    region: str

    def __call__(self, *argv: str, capture: bool = False) -> str:
        where = [f"--project={self.project}", f"--region={self.region}"] if argv[0] == "run" else []
        result = subprocess.run(
            ["gcloud", *argv, *where], stdout=subprocess.PIPE if capture else None, text=True, check=False
        )
        if result.returncode != 0:
            raise CanaryFailed(
                f"gcloud {' '.join(argv[:3])} failed (exit status {result.returncode}); see above"
            )
        return result.stdout or ""

    def service(self, name: str) -> dict[str, Any] | None:
        result = subprocess.run(
            [
                "gcloud",
                "run",
                "services",
                "describe",
                name,
                "--format=json",
                f"--project={self.project}",
                f"--region={self.region}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            if "Cannot find service" in result.stderr:
                return None
            sys.stderr.write(result.stderr)
            raise CanaryFailed(f"gcloud run services describe {name} failed")
        return dict(json.loads(result.stdout))


def serving_revision(service: dict[str, Any] | None) -> str | None:
    live = [t for t in (service or {}).get("status", {}).get("traffic", []) if t.get("percent")]
    return max(live, key=lambda t: t["percent"])["revisionName"] if live else None


def tag_url(service: dict[str, Any], tag: str) -> str:
    return next(t["url"] for t in service["status"]["traffic"] if t.get("tag") == tag)


def say(line: str) -> None:
    print(f"canary: {line}", file=sys.stderr, flush=True)


def rollout_one(gcloud: Gcloud, release: Release, tag: str, steps: Sequence[int], scratch: Path) -> None:
    previous = serving_revision(gcloud.service(release.name))
    revision = f"{release.name}-{tag}"
    manifest = json.loads(json.dumps(release.manifest))
    manifest["spec"]["template"].setdefault("metadata", {})["name"] = revision
    manifest["spec"]["traffic"] = (
        [{"revisionName": previous, "percent": 100}, {"revisionName": revision, "percent": 0, "tag": tag}]
        if previous
        else [{"revisionName": revision, "percent": 100, "tag": tag}]
    )
    path = scratch / f"{release.name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    holding = f"no traffic (it stays on {previous})" if previous else "the traffic (a first deploy)"
    say(f"{release.name}: deploying {revision} with {holding}, tag {tag}")
    gcloud("run", "services", "replace", str(path))
    described = gcloud.service(release.name)
    assert described is not None
    try:
        smoke.check(target(gcloud, release, tag_url(described, tag)))
    except smoke.SmokeFailed as failure:
        gcloud("run", "services", "update-traffic", release.name, f"--remove-tags={tag}")
        moved = "no traffic moved" if previous else "first deploy: it took the traffic when it became ready"
        raise CanaryFailed(
            f"{release.name}: smoke test failed: {failure}; {moved}, tag {tag} removed"
        ) from None
    say(f"{release.name}: smoke test passed through tag {tag}")
    # A first deploy already has all the traffic: there is no other revision to split with (gcloud would refuse).
    for percent in steps if previous else []:
        gcloud("run", "services", "update-traffic", release.name, f"--to-revisions={revision}={percent}")
        say(f"{release.name}: {percent}% on {revision}")
    kept = [f"--update-tags={PREVIOUS}={previous}"] if previous else []
    gcloud("run", "services", "update-traffic", release.name, f"--remove-tags={tag}", *kept)


def target(gcloud: Gcloud, release: Release, url: str) -> smoke.Target:
    """The smoke test's call: as one of the service's own callers (its allow-list's first), to its audience."""
    env = release.env
    caller = env["AUTH_ALLOWED_CALLERS"].split(",")[0]
    token = gcloud(
        "auth", "print-identity-token", f"--impersonate-service-account={caller}",
        f"--audiences={env['AUTH_AUDIENCE']}", "--include-email", capture=True,
    ).strip()  # fmt: skip
    ca = os.environ.get("TLS_CA_FILE")
    return smoke.Target(
        release.kind,
        url,
        token,
        relay="GRPC_PING_HOST" in env,
        ca_file=Path(ca) if ca else None,
        connect_to=os.environ.get("MESH_CONNECT_TO") or None,
    )


def rollback(gcloud: Gcloud, name: str) -> None:
    service = gcloud.service(name)
    previous = next(
        (
            t["revisionName"]
            for t in (service or {}).get("status", {}).get("traffic", [])
            if t.get("tag") == PREVIOUS
        ),
        None,
    )
    if service is None or previous is None:
        raise CanaryFailed(f"{name}: no revision is tagged {PREVIOUS!r}: nothing to roll back to")
    current = serving_revision(service)
    gcloud(
        "run",
        "services",
        "update-traffic",
        name,
        f"--to-revisions={previous}=100",
        f"--update-tags={PREVIOUS}={current}",
    )
    say(f"{name}: traffic back on {previous}; {current} is now tagged {PREVIOUS}")


def traffic_steps(text: str) -> list[int]:
    steps = [int(s) for s in text.split(",") if s.strip()] if text.strip() else [100]
    if any(not 0 < s <= 100 for s in steps) or steps != sorted(steps) or steps[-1] != 100:
        raise argparse.ArgumentTypeError(f"{text!r}: rising percentages ending at 100, e.g. 10,50,100")
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("rollout", help="deploy, smoke-test through a tag, shift traffic")
    out.add_argument("manifests", nargs="*", type=Path)
    out.add_argument("--tag", required=True, help="the new revisions' tag, e.g. sha-$SHORT_SHA")
    out.add_argument(
        "--traffic-steps", type=traffic_steps, default=[100], help="e.g. 10,50,100 (default 100)"
    )
    back = commands.add_parser("rollback", help="put a service back on the revision tagged previous")
    back.add_argument("service")
    for command in (out, back):
        command.add_argument("--project", required=True)
        command.add_argument("--region", required=True)
    args = parser.parse_args(argv)
    gcloud = Gcloud(args.project, args.region)
    try:
        if args.command == "rollback":
            rollback(gcloud, args.service)
            return 0
        releases = [
            Release(str(m["metadata"]["name"]), m)
            for m in (yaml.safe_load(p.read_text()) for p in args.manifests)
        ]
        with tempfile.TemporaryDirectory() as scratch:
            for release in callees_first(releases):
                rollout_one(gcloud, release, args.tag, args.traffic_steps, Path(scratch))
    except CanaryFailed as failure:
        say(f"FAILED: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
