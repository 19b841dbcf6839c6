"""build-support/deploy/affected.py picks the services a change affects.

Pants' part (changed files -> owning targets -> transitive dependents) needs the whole repo and takes tens of
seconds per run, so the program takes it as an injected detector. Here the detector is a stand-in that
reads the real `git diff --name-only BASE HEAD` of a temporary history and follows a dependency table that
mirrors this repo's (every service imports libs/; aggregator's proto imports ping's and routeguide's).
What runs for real: resolving the base in git (HEAD~N, first commit, shallow clone), forcing, and the mapping
from Pants target addresses to service folders.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from deploy.affected import forced_services, main, select, services_for_targets

KNOWN = ["aggregator", "ping", "routeguide"]

# Deployable target -> the path prefixes it depends on (what Pants infers from imports and BUILD files).
DEPENDS_ON = {
    "services/ping:ping": ("services/ping/", "libs/", "protos/ping/"),
    "services/ping:image": ("services/ping/", "services/invokers.yaml"),
    "services/routeguide:routeguide": ("services/routeguide/", "libs/", "protos/routeguide/"),
    "services/routeguide:image": ("services/routeguide/", "services/invokers.yaml"),
    "services/aggregator:aggregator": (
        "services/aggregator/",
        "libs/",
        "protos/aggregator/",
        "protos/ping/",
        "protos/routeguide/",
    ),
    "services/aggregator:image": ("services/aggregator/", "services/invokers.yaml"),
}
TREE = [
    "README.md",
    "libs/mesh/serving.py",
    "protos/ping/ping.proto",
    "protos/routeguide/route_guide.proto",
    "protos/aggregator/v1/aggregator.proto",
    "tests/e2e/mesh_test.py",
    "services/invokers.yaml",
    *(f"services/{s}/{f}" for s in KNOWN for f in ("main.py", "Dockerfile", "service.yaml")),
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30
    ).stdout


def commit(repo: Path, *paths: str) -> None:
    for path in paths:
        file = repo / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(file.read_text() + "# edit\n" if file.exists() else f"# {path}\n")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--message", f"edit {' '.join(paths)}")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    git(tmp_path, "config", "user.email", "test@example.com")
    git(tmp_path, "config", "user.name", "test")
    git(tmp_path, "config", "commit.gpgsign", "false")
    commit(tmp_path, *TREE)
    return tmp_path


class GitDiffDetector:
    """Stands in for `./pants --changed-since=BASE --changed-dependents=transitive list`."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.bases: list[str] = []

    def __call__(self, base: str) -> Sequence[str]:
        self.bases.append(base)
        changed = git(self.repo, "diff", "--name-only", base, "HEAD").splitlines()
        return sorted(t for t, prefixes in DEPENDS_ON.items() if any(f.startswith(prefixes) for f in changed))


def pick(repo: Path, since: str = "HEAD~1", only: Sequence[str] = ()) -> list[str]:
    return select(repo, since=since, only=only, detect=GitDiffDetector(repo), log=lambda _message: None)


@pytest.mark.parametrize(
    ("changed", "selected"),
    [
        ("libs/mesh/serving.py", KNOWN),
        ("protos/ping/ping.proto", ["aggregator", "ping"]),
        ("protos/routeguide/route_guide.proto", ["aggregator", "routeguide"]),
        ("protos/aggregator/v1/aggregator.proto", ["aggregator"]),
        ("services/ping/main.py", ["ping"]),
        ("services/ping/service.yaml", ["ping"]),
        ("services/routeguide/Dockerfile", ["routeguide"]),
        ("services/invokers.yaml", KNOWN),  # who may reach whom is rendered into every manifest
        ("README.md", []),
        ("tests/e2e/mesh_test.py", []),
    ],
)
def test_selects_what_a_commit_affects(repo: Path, changed: str, selected: list[str]) -> None:
    commit(repo, changed)
    assert pick(repo) == selected


def test_the_base_is_the_resolved_commit(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD").strip()
    commit(repo, "services/ping/main.py")
    detector = GitDiffDetector(repo)
    select(repo, since="HEAD~1", only=(), detect=detector, log=lambda _message: None)
    assert detector.bases == [base]


def test_several_commits_since_an_older_base(repo: Path) -> None:
    commit(repo, "services/ping/main.py")
    commit(repo, "README.md")
    commit(repo, "services/routeguide/main.py")
    assert pick(repo, since="HEAD~1") == ["routeguide"]
    assert pick(repo, since="HEAD~3") == ["ping", "routeguide"]


def test_a_deleted_file_counts_as_a_change(repo: Path) -> None:
    git(repo, "rm", "--quiet", "services/aggregator/main.py")
    git(repo, "commit", "--quiet", "--message", "remove")
    assert pick(repo) == ["aggregator"]


def test_no_base_in_history_selects_everything(repo: Path) -> None:
    # The first commit has no HEAD~1: deploying everything is safe, missing a deploy is not.
    assert pick(repo) == KNOWN
    assert pick(repo, since="no-such-branch") == KNOWN


def test_a_shallow_clone_selects_everything(repo: Path, tmp_path: Path) -> None:
    commit(repo, "README.md")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--depth=1", f"file://{repo}", str(clone))
    assert pick(clone) == KNOWN


def test_forcing_overrides_the_history(repo: Path) -> None:
    commit(repo, "README.md")
    assert pick(repo, only=["ping"]) == ["ping"]
    assert pick(repo, only=["all"]) == KNOWN
    assert pick(repo, only=[""]) == []  # an empty _SERVICES means: what changed


@pytest.mark.parametrize(
    ("targets", "selected"),
    [
        (["services/ping:ping"], ["ping"]),
        (["services/ping:image", "services/aggregator:aggregator"], ["aggregator", "ping"]),
        (["services/routeguide/main.py", "services/routeguide:routeguide"], ["routeguide"]),
        (["//:mesh", "libs/mesh:mesh", "tests/deploy:tests", "protos/ping:ping"], []),
        (["services/unknown:unknown", "services:invokers", "services/__init__.py:services"], []),
        ([], []),
    ],
)
def test_targets_map_to_service_folders(targets: list[str], selected: list[str]) -> None:
    assert services_for_targets(targets, KNOWN) == selected


@pytest.mark.parametrize(
    ("specs", "forced"),
    [
        ([], None),
        ([""], None),
        ([" , "], None),
        (["all"], KNOWN),
        (["ping"], ["ping"]),
        (["routeguide,ping"], ["ping", "routeguide"]),
        (["ping", "aggregator"], ["aggregator", "ping"]),
    ],
)
def test_forced_selection(specs: list[str], forced: list[str] | None) -> None:
    assert forced_services(specs, KNOWN) == forced


def test_an_unknown_forced_service_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown service.s. pong; known: aggregator, ping, routeguide"):
        forced_services(["ping,pong"], KNOWN)


def test_command_line_reads_pants_output_on_stdin(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("libs/mesh:mesh\nservices/ping:ping\nservices/ping:image\n")
    )
    assert main(["--stdin", f"--root={repo}"]) == 0
    assert capsys.readouterr().out == "ping\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("services/ping:ping\n"))
    assert main(["--stdin", "--all", f"--root={repo}"]) == 0
    assert capsys.readouterr().out == "aggregator\nping\nrouteguide\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("libs/mesh:mesh\n"))
    assert main(["--stdin", f"--root={repo}"]) == 0
    assert capsys.readouterr().out == ""  # an empty file: cloudbuild.yaml's steps skip on `[ -s ... ]`


def test_command_line_refuses_an_unknown_service(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--only=pong", f"--root={repo}"])
    assert exit_info.value.code == 2
    assert "unknown service(s) pong" in capsys.readouterr().err
