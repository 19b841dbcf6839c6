"""Which services a commit affects, one name per line: what cloudbuild.yaml packages, pushes and deploys.

    python -m deploy.affected --since HEAD~1          # Pants: changed targets and their dependents
    python -m deploy.affected --only ping,routeguide  # forced (a manual run); --only all, or --all
    ./pants ... list | python -m deploy.affected --stdin

Pants works out what changed (`--changed-since`, transitive dependents, filtered to the deployable target
types); this program resolves the base commit, maps the deployable targets to service folders and applies
a forced selection. When the base cannot be resolved (the first commit, a shallow clone) it selects every
service: deploying too much is safe, missing a deploy is not.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from deploy.layout import SERVICES_DIR, deployable_services

# The deployables of a service folder: its PEX and its image (which depends on the Cloud Run manifests, so
# an edit to service.yaml or the Dockerfile redeploys too).
DEPLOYABLE_TYPES = "pex_binary,docker_image"
ALL = "all"

# Base commit (full sha) -> addresses of the changed targets and their transitive dependents.
ChangeDetector = Callable[[str], Sequence[str]]


def services_for_targets(targets: Iterable[str], known: Collection[str]) -> list[str]:
    """services/ping:ping, services/ping:image, services/ping/main.py -> ping; anything outside a known
    service folder (libs, protos, tests, root targets) selects nothing by itself."""
    selected = set()
    for address in targets:
        path = address.strip().split(":", 1)[0]
        parts = path.split("/")
        if len(parts) >= 2 and parts[0] == SERVICES_DIR and parts[1] in known:
            selected.add(parts[1])
    return sorted(selected)


def forced_services(specs: Iterable[str], known: Collection[str]) -> list[str] | None:
    """Names given by hand (`ping,routeguide`, or `all`); None when nothing was forced (all specs empty)."""
    names = {name.strip() for spec in specs for name in spec.split(",") if name.strip()}
    if not names:
        return None
    if ALL in names:
        return sorted(known)
    unknown = sorted(names - set(known))
    if unknown:
        raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return sorted(names)


def resolve_commit(root: Path, ref: str) -> str | None:
    """The full sha of ref, or None when this clone cannot see it."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return result.stdout.strip()


def pants_detector(root: Path) -> ChangeDetector:
    def detect(base: str) -> Sequence[str]:
        argv = [
            "./pants",
            "--no-pantsd",
            f"--changed-since={base}",
            "--changed-dependents=transitive",
            f"--filter-target-type={DEPLOYABLE_TYPES}",
            "list",
        ]
        return subprocess.run(
            argv, cwd=root, stdout=subprocess.PIPE, text=True, check=True
        ).stdout.splitlines()

    return detect


def select(
    root: Path, *, since: str, only: Sequence[str], detect: ChangeDetector, log: Callable[[str], None]
) -> list[str]:
    known = deployable_services(root)
    forced = forced_services(only, known)
    if forced is not None:
        log(f"forced: {' '.join(forced)}")
        return forced
    base = resolve_commit(root, since)
    if base is None:
        log(f"{since} is not in this clone's history: selecting every service")
        return known
    selected = services_for_targets(detect(base), known)
    log(f"changed since {since} ({base[:12]}): {' '.join(selected) or 'no service'}")
    return selected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--since", default="HEAD~1", help="base ref for --changed-since (default HEAD~1)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="force these services (comma-separated, or 'all'); empty: ignored",
    )
    parser.add_argument("--all", action="store_true", help="same as --only all")
    parser.add_argument("--stdin", action="store_true", help="read Pants target addresses from stdin")
    parser.add_argument(
        "--root", type=Path, default=Path.cwd(), help="repo root (default: the current directory)"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"affected: {message}", file=sys.stderr)

    only = [*args.only, ALL] if args.all else args.only
    try:
        if args.stdin:
            known = deployable_services(args.root)
            services = forced_services(only, known) or services_for_targets(
                sys.stdin.read().splitlines(), known
            )
        else:
            services = select(
                args.root, since=args.since, only=only, detect=pants_detector(args.root), log=log
            )
    except ValueError as error:
        parser.error(str(error))
    except subprocess.CalledProcessError as error:
        # Fail the build: guessing here would deploy too little (or everything, unverified).
        log(f"{shlex.join(error.cmd)} failed with exit code {error.returncode}; see its output above")
        return 1
    for service in services:  # nothing at all when no service is affected: the pipeline tests `-s`
        print(service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
