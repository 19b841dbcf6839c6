"""Applies services/invokers.yaml: roles/run.invoker on each Cloud Run service for its callers' accounts.

    python -m deploy.invokers --project P --region R [--dry-run] [SERVICE ...]

Runs one idempotent `gcloud run services add-iam-policy-binding` per (service, caller), for the named Cloud
Run services (default: all in the file); --dry-run prints the commands as a shell script instead. It only
adds bindings: one removed from the file must be removed by hand (remove-iam-policy-binding).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from deploy.layout import INVOKERS_FILE

ROLE = "roles/run.invoker"
PUBLIC_MEMBERS = {"allUsers", "allAuthenticatedUsers"}


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
                f"{service!r} would be public ({', '.join(sorted(public))}); services are private"
            )
        result[str(service)] = list(accounts)
    return result


def account_email(account: str, project: str) -> str:
    return f"{account}@{project}.iam.gserviceaccount.com"


def binding_commands(
    invokers: Mapping[str, Sequence[str]], *, project: str, region: str, services: Sequence[str] = ()
) -> list[list[str]]:
    unknown = sorted(set(services) - set(invokers))
    if unknown:
        raise ValueError(f"no invokers listed for {', '.join(unknown)}")
    return [
        [
            "gcloud",
            "run",
            "services",
            "add-iam-policy-binding",
            service,
            f"--project={project}",
            f"--region={region}",
            f"--member=serviceAccount:{account_email(account, project)}",
            f"--role={ROLE}",
            "--quiet",
        ]
        for service in (services or sorted(invokers))
        for account in invokers[service]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", required=True, help="project id")
    parser.add_argument("--region", required=True)
    parser.add_argument("--file", type=Path, default=INVOKERS_FILE, help=f"default {INVOKERS_FILE}")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    parser.add_argument(
        "services", nargs="*", help="Cloud Run service names (default: every one in the file)"
    )
    args = parser.parse_args(argv)

    try:
        commands = binding_commands(
            load_invokers(args.file.read_text()),
            project=args.project,
            region=args.region,
            services=args.services,
        )
    except ValueError as error:
        parser.error(f"{args.file}: {error}")
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
