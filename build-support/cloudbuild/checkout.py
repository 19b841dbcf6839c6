"""The build's source: built-in substitutions read from a local git checkout, and its workspace.

The workspace is a fresh clone of the checkout's HEAD, as a Cloud Build trigger clones the pushed commit: the
steps see what was committed (not the working tree's edits), write into /workspace freely, and a `./pants`
they run has its own build root, so it never waits on the lock of a `./pants` the caller is running.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Project:
    id: str
    number: str
    location: str


def git(root: Path, *argv: str) -> str:
    return subprocess.run(
        ["git", *argv], cwd=root, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def built_in(root: Path, project: Project, config_path: str) -> Mapping[str, str]:
    """Cloud Build's built-ins for a trigger build of root's HEAD on its current branch."""
    commit = git(root, "rev-parse", "HEAD")
    branch = git(root, "branch", "--show-current")
    repo = root.resolve().name
    return {
        "PROJECT_ID": project.id,
        "PROJECT_NUMBER": project.number,
        "LOCATION": project.location,
        "BUILD_ID": str(uuid.uuid4()),
        "TRIGGER_NAME": "local",
        "TRIGGER_BUILD_CONFIG_PATH": config_path,
        "COMMIT_SHA": commit,
        "REVISION_ID": commit,
        "SHORT_SHA": commit[:7],
        "REPO_NAME": repo,
        "REPO_FULL_NAME": repo,
        "BRANCH_NAME": branch,
        "REF_NAME": branch,
        "TAG_NAME": "",
        "SERVICE_ACCOUNT_EMAIL": f"{project.number}@cloudbuild.gserviceaccount.com",
        "SERVICE_ACCOUNT": f"projects/{project.id}/serviceAccounts/{project.number}@cloudbuild.gserviceaccount.com",
    }


def clone(root: Path, into: Path) -> Path:
    """A clone of root's HEAD with its whole history (the pipeline's history step finds it not shallow)."""
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(root), str(into)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    git(into, "checkout", "--quiet", "--detach", git(root, "rev-parse", "HEAD"))
    return into
