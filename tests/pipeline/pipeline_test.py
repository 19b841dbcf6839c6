"""The whole cloudbuild.yaml, run by the local runner on a temporary git history of this repository, against
one project (its registry and Cloud Run services kept between builds, as a real project keeps them):

1. a commit changing only services/ping deploys only ping (its two Cloud Run services), pushed, pulled back
   by the digest of its push and serving, through the canary, its invokers those of services/invokers.yaml;
2. a commit changing libs/ deploys all three services, the called before their callers, each new revision
   without traffic until its smoke test passed, and an invoker bound by hand meanwhile is revoked;
3. a docs-only commit deploys nothing;
   then a rollback (deploy/canary.py's, in a build of its own) puts ping's traffic back on `previous`;
4. a commit whose routeguide answers wrongly (its built-in data changed) fails the build at routeguide's
   smoke test, and routeguide's traffic stays where it was.

The revisions run from their images on the local Cloud Run (cloudrun.platform): behind its front end, by
their run.app URLs, their traffic split by the front end in the canary's steps (_TRAFFIC_STEPS=10,50,100).

The tests run in this order on one history (each build's starting point is the previous one's end). Verify
is left out (`_VERIFY=none`): it runs `./pants lint check test` on what changed, which CI has just done on the
same sources, and would make this test as long as CI itself; its step semantics are the runner's own tests'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cloudbuild.__main__ import main as cloudbuild

from engine import base_image, daemon
from tests.images.containers import engine_or_skip

ROOT = Path(__file__).resolve().parents[2]
# The repository's top level (the Pants sandbox also holds the test's own tools).
TOP_LEVEL = [
    ".ci", ".flake8", ".gitignore", "BENCHMARKS.md", "BUILD", "README.md", "RELIABILITY.md", "build-support",
    "cloudbuild.yaml", "libs", "pants", "pants.toml", "protos", "pyproject.toml", "python-default.lock",
    "requirements.txt", "services", "tests", "docs",
]  # fmt: skip
# Each build packages, builds and deploys for real (1-4 minutes each); pytest's default timeout is 120 s.
pytestmark = pytest.mark.timeout(900)
REPLACE = "run services replace"
INVOKER = "roles/run.invoker"
TRAFFIC = "run services update-traffic"
# A build of one step after the package: the canary's rollback of ping, as an operator runs it.
ROLLBACK = """
substitutions:
  _REGISTRY: unused
options:
  substitutionOption: ALLOW_LOOSE
steps:
  - id: package
    name: pants-builder
    entrypoint: bash
    args: [-ceu, ./pants --no-pantsd package build-support/deploy:canary]
  - id: rollback
    name: gcr.io/google.com/cloudsdktool/cloud-sdk:slim
    entrypoint: python3
    args: [dist/build-support.deploy/canary.pex, rollback, ping, --project=$PROJECT_ID, --region=europe-west1]
"""


@dataclass
class Project:
    repo: Path
    state: Path
    records: Path

    def git(self, *argv: str) -> str:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
        return subprocess.run(
            ["git", *argv], cwd=self.repo, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit(self, message: str, path: str, edit: Any) -> str:
        target = self.repo / path
        target.write_text(edit(target.read_text()))
        self.git("commit", "--quiet", "--all", f"--message={message}")
        return self.git("rev-parse", "--short=7", "HEAD")


@dataclass
class Outcome:
    code: int
    seconds: float
    records: list[dict[str, Any]]
    output: str

    def replaced(self) -> list[str]:
        return [r["service"] for r in self.records if r["command"] == REPLACE]

    def images(self) -> dict[str, list[str]]:
        return next(r["images"] for r in self.records if r["command"] == "registry")

    def digests(self) -> dict[str, str]:
        return dict(next(r["digests"] for r in self.records if r["command"] == "registry"))

    def first(self, command: str, service: str) -> dict[str, Any]:
        return next(r for r in self.records if r["command"] == command and r.get("service") == service)

    def last(self, command: str, service: str) -> dict[str, Any]:
        return self.all(command, service)[-1]

    def all(self, command: str, service: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["command"] == command and r.get("service") == service]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    engine = engine_or_skip()
    try:
        base_image.ensure(engine)
        os.environ.update(engine.env())
        scratch = tmp_path_factory.mktemp("pipeline")
        found = Project(scratch / "repo", scratch / "project", scratch / "records")
        found.repo.mkdir()
        found.records.mkdir()
        for name in TOP_LEVEL:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, found.repo / name, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True
                )
            elif source.exists():
                shutil.copy2(source, found.repo / name)
        found.git("init", "--quiet", "--initial-branch=main")
        found.git("add", "--all")
        found.git("commit", "--quiet", "--message=the repository as CI sees it")
        yield found
    finally:
        if engine.started:
            daemon.stop()


def build(project: Project, capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> Outcome:
    record = project.records / f"{name}.jsonl"
    began = time.monotonic()
    code = cloudbuild(["--root", str(project.repo), "--state", str(project.state), "--record", str(record),
                       "--substitutions=^;^_VERIFY=none;_TRAFFIC_STEPS=10,50,100", *extra])  # fmt: skip
    seconds = time.monotonic() - began
    captured = capsys.readouterr()
    print(f"pipeline {name}: exit {code} in {seconds:.0f} s")  # the figure for the report (-s shows it)
    records = [json.loads(line) for line in record.read_text().splitlines()]
    return Outcome(code, seconds, records, captured.out + captured.err)


def services_now(project: Project) -> dict[str, Any]:
    return {s["name"]: s for s in json.loads((project.state / "cloudrun" / "services.json").read_text())}


def test_a_ping_only_commit_deploys_only_ping(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    sha = project.commit(
        "ping: a comment", "services/ping/main.py", lambda t: t + "# touched by the pipeline test\n"
    )
    outcome = build(project, capsys, "ping")
    assert outcome.code == 0, outcome.output[-3000:]
    # ping's image serves both of ping's Cloud Run services; the upstream first.
    assert outcome.replaced() == ["ping-upstream", "ping"]
    assert outcome.images() == {"local-project/mesh/ping": [sha]}
    pushed = outcome.digests()[f"local-project/mesh/ping:{sha}"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pushed)
    for service in ("ping-upstream", "ping"):
        replaced = outcome.first(REPLACE, service)
        # Pulled back from the registry by the digest of the push (not the tag, which can move), and serving
        # (the stand-in records a replace once the probe passed).
        assert replaced["revision"] == f"{service}-sha-{sha}"
        assert replaced["image"].endswith(f"/local-project/mesh/ping@{pushed}")
        # The smoke test's token, as one of the service's callers, for its audience.
        audience = f"https://{service}-123456789012.europe-west1.run.app"
        assert any(
            r.get("audience") == audience
            for r in outcome.records
            if r["command"] == "auth print-identity-token"
        )
        assert outcome.last(TRAFFIC, service)["traffic"] == [
            {"revision": f"{service}-sha-{sha}", "percent": 100, "tag": None}
        ]
    assert "canary: ping: smoke test passed through tag sha-" in outcome.output
    # Then the invokers services/invokers.yaml lists, and only those.
    sa = "serviceAccount:{}@local-project.iam.gserviceaccount.com".format
    assert services_now(project)["ping"]["bindings"] == [
        [sa("aggregator-sa"), INVOKER],
        [sa("mesh-client"), INVOKER],
    ]
    assert services_now(project)["ping-upstream"]["bindings"] == [[sa("ping-sa"), INVOKER]]


def test_a_libs_commit_deploys_all_three_the_called_first(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    before = services_now(project)
    # Someone grants run.invoker on ping by hand between the builds; the file does not list them.
    saved = project.state / "cloudrun" / "services.json"
    saved.write_text(
        json.dumps([
            {**s, "bindings": [*s["bindings"], ["user:someone@example.com", INVOKER]]} if s["name"] == "ping" else s
            for s in json.loads(saved.read_text())
        ])
    )  # fmt: skip
    sha = project.commit(
        "libs: a comment", "libs/mesh/serving.py", lambda t: t + "# touched by the pipeline test\n"
    )
    outcome = build(project, capsys, "libs")
    assert outcome.code == 0, outcome.output[-3000:]
    order = outcome.replaced()
    assert sorted(order) == ["aggregator", "ping", "ping-upstream", "routeguide"]
    assert order.index("routeguide") < order.index("aggregator")
    assert order.index("ping-upstream") < order.index("ping") < order.index("aggregator")
    assert {repo for repo, tags in outcome.images().items() if sha in tags} == {
        f"local-project/mesh/{s}" for s in ("ping", "routeguide", "aggregator")
    }
    # ping was serving: its new revision came without traffic and a tag, the old one kept serving meanwhile,
    # and once the smoke test passed the traffic moved and the old revision is named `previous`.
    old = next(r["revision"] for r in before["ping"]["traffic"] if r["percent"] == 100)
    new = f"ping-sha-{sha}"
    assert outcome.first(REPLACE, "ping")["traffic"] == [
        {"revision": old, "percent": 100, "tag": None},
        {"revision": new, "percent": 0, "tag": f"sha-{sha}"},
    ]
    assert sorted(services_now(project)["ping"]["traffic"], key=lambda r: r["percent"]) == [
        {"revision": old, "percent": 0, "tag": "previous"},
        {"revision": new, "percent": 100, "tag": None},
    ]
    # The canary's steps, each applied to the front end's split (set_service returns once Envoy routes by it);
    # before the first, the new revision had answered the smoke test's calls (grpc.health, SendUpstream) while
    # it had no traffic: through the front end, by its tag's URL alone.
    steps = outcome.all(TRAFFIC, "ping")
    assert [
        {(r["revision"], r["percent"]) for r in step["traffic"] if r["percent"]} for step in steps[:3]
    ] == [{(old, 90), (new, 10)}, {(old, 50), (new, 50)}, {(new, 100)}]
    assert steps[0]["served"][new] >= 2, steps[0]
    assert "Service URL: https://ping-123456789012.europe-west1.run.app" in outcome.output
    assert "invokers: ping: remove user:someone@example.com" in outcome.output
    assert ["user:someone@example.com", INVOKER] not in services_now(project)["ping"]["bindings"]
    assert before["ping"]["bindings"] == services_now(project)["ping"]["bindings"]


def test_a_docs_only_commit_deploys_nothing(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    before = services_now(project)
    project.commit("docs: a line", "README.md", lambda t: t + "\nA line for the pipeline test.\n")
    outcome = build(project, capsys, "docs")
    assert outcome.code == 0, outcome.output[-3000:]
    assert outcome.replaced() == [] and "nothing to deploy" in outcome.output
    assert services_now(project) == before


def test_a_rollback_puts_the_traffic_back_on_the_previous_revision(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {(r["revision"], r["percent"], r["tag"]) for r in services_now(project)["ping"]["traffic"]}
    previous = next(revision for revision, _, tag in before if tag == "previous")
    current = next(revision for revision, percent, _ in before if percent == 100)
    config = project.records / "rollback.yaml"
    config.write_text(ROLLBACK)
    outcome = build(project, capsys, "rollback", f"--config={config}")
    assert outcome.code == 0, outcome.output[-3000:]
    assert f"canary: ping: traffic back on {previous}; {current} is now tagged previous" in outcome.output
    assert {(r["revision"], r["percent"], r["tag"]) for r in services_now(project)["ping"]["traffic"]} == {
        (previous, 100, None),
        (current, 0, "previous"),
    }
    # The front end routes by it: the revision put back is running and takes the service's traffic.
    moved = outcome.last(TRAFFIC, "ping")
    assert set(moved["served"]) == {previous, current}, moved


def test_a_revision_failing_its_smoke_test_moves_no_traffic_and_fails_the_build(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    serving = next(
        r["revision"] for r in services_now(project)["routeguide"]["traffic"] if r["percent"] == 100
    )
    # The image still starts and serves health; only its answers are wrong.
    sha = project.commit(
        "routeguide: a renamed place",
        "services/routeguide/route_guide_db.json",
        lambda t: t.replace("Berkshire Valley Management Area Trail", "Somewhere Else", 1),
    )
    outcome = build(project, capsys, "broken")
    assert outcome.code == 1
    assert outcome.replaced() == ["routeguide"]
    assert outcome.first(REPLACE, "routeguide")["traffic"][0] == {
        "revision": serving,
        "percent": 100,
        "tag": None,
    }
    assert (
        "canary: FAILED: routeguide: smoke test failed: routeguide.GetFeature: the first canonical place is named"
        " 'Somewhere Else, Jefferson, NJ, USA'; no traffic moved, tag sha-" + sha + " removed"
    ) in outcome.output
    assert 'build step 7 "gcr.io/google.com/cloudsdktool/cloud-sdk:slim" (deploy) failed' in outcome.output
    # Traffic where it was, the failed revision no longer reachable by its tag.
    assert [r for r in services_now(project)["routeguide"]["traffic"] if r["percent"] or r["tag"]] == [
        {"revision": serving, "percent": 100, "tag": None}
    ]
