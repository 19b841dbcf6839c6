"""Makes services/invokers.yaml the whole truth about who may invoke each Cloud Run service.

    python invokers.pex --project P --region R [--dry-run] [SERVICE ...]
    python -m deploy.invokers ...            (the same, from the source tree)

For each named Cloud Run service (default: every one in the file) it reads the live policy (`gcloud run
services get-iam-policy`), prints the plan (the roles/run.invoker members to add and to remove), then applies
it with `gcloud run services add-iam-policy-binding` / `remove-iam-policy-binding`: a caller taken out of the
file, or a member bound by hand, loses the role at the next deploy. --dry-run prints the plan only. Other
roles are left alone. The file may not make a service public (allUsers, allAuthenticatedUsers): every
service is deployed --no-allow-unauthenticated, and such a member in the live policy is removed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from deploy.layout import INVOKERS_FILE

ROLE = "roles/run.invoker"
PUBLIC_MEMBERS = {"allUsers", "allAuthenticatedUsers"}
# A service account's id (the part of its email before @): what the file lists.
ACCOUNT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")


class GcloudError(RuntimeError):
    pass


def load_invokers(text: str) -> dict[str, list[str]]:
    """Cloud Run service name -> service-account ids allowed to invoke it."""
    document = yaml.safe_load(text)
    invokers = document.get("invokers") if isinstance(document, dict) else None
    if not isinstance(invokers, dict):
        raise ValueError("expected a mapping `invokers: {service: [account, ...]}`")
    result: dict[str, list[str]] = {}
    for service, accounts in invokers.items():
        if not isinstance(accounts, list) or not all(isinstance(a, str) and a for a in accounts):
            raise ValueError(f"invokers of {service!r} must be a list of service-account ids")
        public = PUBLIC_MEMBERS.intersection(accounts)
        if public:
            raise ValueError(
                f"{service!r} would be public ({', '.join(sorted(public))}): services are private,"
                " list the service accounts that call it"
            )
        wrong = [a for a in accounts if not ACCOUNT_ID.fullmatch(a)]
        if wrong:
            raise ValueError(
                f"invokers of {service!r}: {wrong[0]!r} is not a service-account id"
                f" (the part of its email before @, matching {ACCOUNT_ID.pattern})"
            )
        result[str(service)] = list(accounts)
    return result


def account_email(account: str, project: str) -> str:
    return f"{account}@{project}.iam.gserviceaccount.com"


def wanted_members(
    invokers: Mapping[str, Sequence[str]], *, project: str, services: Sequence[str] = ()
) -> dict[str, set[str]]:
    """Cloud Run service -> the IAM members the file grants run.invoker on it."""
    unknown = sorted(set(services) - set(invokers))
    if unknown:
        raise ValueError(f"no invokers listed for {', '.join(unknown)}")
    return {
        service: {f"serviceAccount:{account_email(a, project)}" for a in invokers[service]}
        for service in (services or sorted(invokers))
    }


def invoker_members(policy: Mapping[str, object]) -> set[str]:
    """The run.invoker members of a policy as `get-iam-policy --format=json` prints it."""
    bindings = policy.get("bindings") or []
    assert isinstance(bindings, list)
    return {m for b in bindings if b.get("role") == ROLE for m in b["members"]}


@dataclass(frozen=True)
class Change:
    service: str
    add: tuple[str, ...]
    remove: tuple[str, ...]

    def lines(self) -> list[str]:
        if not (self.add or self.remove):
            return [f"invokers: {self.service}: unchanged"]
        return [f"invokers: {self.service}: add {m}" for m in self.add] + [
            f"invokers: {self.service}: remove {m}" for m in self.remove
        ]


def plan(wanted: Mapping[str, set[str]], live: Mapping[str, set[str]]) -> list[Change]:
    return [
        Change(service, tuple(sorted(members - live[service])), tuple(sorted(live[service] - members)))
        for service, members in wanted.items()
    ]


class Gcloud:
    """The gcloud commands the plan needs, for one project and region."""

    def __init__(self, project: str, region: str) -> None:
        self.where = [f"--project={project}", f"--region={region}"]

    def run(self, *argv: str) -> str:
        done = subprocess.run(["gcloud", *argv, *self.where], capture_output=True, text=True)
        if done.returncode != 0:
            raise GcloudError(f"gcloud {' '.join(argv[:3])} failed: {done.stderr.strip()}")
        return done.stdout

    def members(self, service: str) -> set[str]:
        return invoker_members(
            json.loads(self.run("run", "services", "get-iam-policy", service, "--format=json"))
        )

    def apply(self, change: Change) -> None:
        for verb, members in (("add", change.add), ("remove", change.remove)):
            for member in members:
                self.run(
                    "run", "services", f"{verb}-iam-policy-binding", change.service,
                    f"--member={member}", f"--role={ROLE}", "--quiet",
                )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", required=True, help="project id")
    parser.add_argument("--region", required=True)
    parser.add_argument("--file", type=Path, default=INVOKERS_FILE, help=f"default {INVOKERS_FILE}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument(
        "services", nargs="*", help="Cloud Run service names (default: every one in the file)"
    )
    args = parser.parse_args(argv)

    try:
        wanted = wanted_members(
            load_invokers(args.file.read_text()), project=args.project, services=args.services
        )
    except ValueError as error:
        parser.error(f"{args.file}: {error}")
    gcloud = Gcloud(args.project, args.region)
    try:
        changes = plan(wanted, {service: gcloud.members(service) for service in wanted})
        for change in changes:
            print("\n".join(change.lines()), flush=True)
        if not args.dry_run:
            for change in changes:
                gcloud.apply(change)
    except GcloudError as error:
        print(f"invokers: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
