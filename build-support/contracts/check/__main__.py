"""The contract checks (README: "Contracts"): `buf lint` of protos/, and `buf breaking` against a base commit.

    ./pants run build-support/contracts -- [--against REF] [--root DIR]

The rules and their written-down exceptions are protos/buf.yaml's. With --against, the protos of the working
tree are compared with those of commit REF (taken with `git archive`, so a worktree or a shallow clone that has
REF works); a change that breaks a caller still on REF's contract fails with buf's own lines, each naming the
file, the message and the field (or the service and the method). A break is made on purpose only by a new
package version beside the old one (`routeguide.v2` next to `routeguide`), which adds and breaks nothing.
Exit status: 0 clean, 1 lint findings or breaking changes, 2 buf cannot run or REF is not a commit here.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from contracts.check import buf

PROTOS = "protos"
FINDINGS, UNUSABLE = 1, 2
GIT_TIMEOUT_S = 60
BUF_TIMEOUT_S = 120


def say(line: str) -> None:
    print(f"contracts: {line}", file=sys.stderr, flush=True)


def run_buf(launcher: Path, args: Sequence[str], cwd: Path) -> int:
    # buf prints its findings itself: its lines are the message, unchanged.
    return subprocess.run([str(launcher), *args], cwd=cwd, timeout=BUF_TIMEOUT_S, check=False).returncode


def export_protos(root: Path, ref: str, into: Path) -> Path | None:
    """REF's protos/ written under `into`; None when REF has no protos/. Raises ValueError if REF is unknown."""
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=False,
    )
    if commit.returncode != 0:
        shallow = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--is-shallow-repository"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        ).stdout.strip()
        hint = (
            " (a shallow clone: fetch more history, e.g. git fetch --deepen=1)" if shallow == "true" else ""
        )
        raise ValueError(f"{ref!r} is not a commit in {root}{hint}")
    tree = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "-d", "--name-only", commit.stdout.strip(), PROTOS],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    if not tree.stdout.strip():
        return None
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", commit.stdout.strip(), PROTOS],
        capture_output=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / PROTOS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contracts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", metavar="REF", help="also fail on changes that break REF's contracts")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY", ".")),
        help="the git checkout whose protos/ are checked (default: the repository ./pants runs in)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    module = root / PROTOS
    try:
        launcher = buf.installed()
    except (buf.NoBuf, OSError, subprocess.SubprocessError) as error:
        say(f"cannot run buf: {error}")
        return UNUSABLE

    failed = False
    if run_buf(launcher, ["lint"], module) != 0:
        say(f"buf lint failed: fix the lines above, or write the exception down in {PROTOS}/buf.yaml")
        failed = True
    else:
        say("buf lint: clean")
    if args.against:
        with tempfile.TemporaryDirectory(prefix="contracts-") as scratch:
            try:
                base = export_protos(root, args.against, Path(scratch))
            except ValueError as error:
                say(f"cannot compare: {error}")
                return UNUSABLE
            if base is None:
                say(f"{args.against} has no {PROTOS}/: nothing it published can break")
            elif run_buf(launcher, ["breaking", "--against", str(base)], module) != 0:
                say(
                    f"buf breaking: the lines above break callers still on {args.against}'s contracts. To change"
                    " a contract on purpose, add a new package version beside the old one (e.g. routeguide.v2"
                    " in protos/routeguide/v2/) and move callers to it; the old one stays until none is left"
                )
                failed = True
            else:
                say(f"buf breaking against {args.against}: nothing breaks")
    return FINDINGS if failed else 0


if __name__ == "__main__":
    sys.exit(main())
