"""cloudbuild.yaml: valid for Cloud Build (the schema check-jsonschema ships, offline), every substitution
declared or built in, bash's own `$` escaped, and the steps in the order the pipeline needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from cloudbuild import config as build_config
from cloudbuild.substitutions import BUILT_IN as RUNNER_BUILT_IN

from deploy import affected, canary, invokers, render
from deploy.reach import Vpc
from tests.deploy.repo import ROOT

CLOUDBUILD = ROOT / "cloudbuild.yaml"
# Cloud Build's own substitutions (all builds, and builds started by a trigger).
BUILT_IN = {
    "PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID",
    "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "REF_NAME",
}  # fmt: skip
REFERENCE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.cloudbuild", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def config() -> dict[str, Any]:
    document = yaml.safe_load(CLOUDBUILD.read_text())
    assert isinstance(document, dict)
    return document


def step_text() -> str:
    return "\n".join(
        " ".join([step["name"], step.get("entrypoint", ""), *step.get("args", [])])
        for step in config()["steps"]
    )


def references() -> set[str]:
    """Every substitution the steps name, with bash's `$$` (a literal `$`) taken out."""
    names = set()
    for match in REFERENCE.finditer(step_text().replace("$$", "")):
        names.add(match["braced"] if match["braced"] is not None else match["bare"])
    return names


def test_validates_against_the_cloud_build_schema() -> None:
    result = check_jsonschema(CLOUDBUILD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_reports_an_invalid_config(tmp_path: Path) -> None:
    broken = tmp_path / "cloudbuild.yaml"
    broken.write_text("steps:\n  - name: gcr.io/cloud-builders/git\n    waitFor: history\n")
    result = check_jsonschema(broken)
    assert result.returncode == 1
    assert "waitFor" in result.stdout


def test_substitutions_have_defaults_and_are_all_used() -> None:
    declared = config()["substitutions"]
    assert {
        "_REGION",
        "_REPOSITORY",
        "_SERVICES",
        "_BASE_REF",
        "_VERIFY",
        "_VPC",
        "_NETWORK",
        "_SUBNET",
    } <= set(declared)
    assert all(isinstance(value, str) for value in declared.values())
    assert declared["_SERVICES"] == ""  # a push deploys what changed; a manual run sets all or a list
    # _REGISTRY is made of others (dynamicSubstitutions); every other declared one is named by a step.
    assert config()["options"]["dynamicSubstitutions"] is True
    parts = {m["braced"] or m["bare"] for m in REFERENCE.finditer(declared["_REGISTRY"])}
    used = references() | parts
    assert used - BUILT_IN == set(declared)
    # Cloud Build fails a build whose config names an undeclared substitution (or declares an unused one):
    # the local runner applies the same rules, so the file loads there with every built-in filled in.
    assert BUILT_IN <= set(RUNNER_BUILT_IN)
    build = build_config.load(CLOUDBUILD.read_text(), {name: "x" for name in RUNNER_BUILT_IN}, {})
    assert build.substitutions["_REGISTRY"] == "europe-west1-docker.pkg.dev/x/mesh"


def test_every_dollar_is_a_substitution_or_escaped_for_bash() -> None:
    # A bare `$svc` or `$(...)` would be taken by Cloud Build; bash variables are written `$$svc`.
    for name in references():
        assert re.fullmatch(r"_?[A-Z][A-Z0-9_]*", name), f"${name}: write $${name} for a bash variable"
    assert not re.search(r"\$(?![{A-Z_$])", step_text().replace("$$", ""))


def test_pipeline_steps_in_order() -> None:
    steps = {step["id"]: step for step in config()["steps"]}
    assert list(steps) == ["history", "builder", "verify", "select", "package", "images", "deploy"]
    script = {name: " ".join(step.get("args", [])) for name, step in steps.items()}
    assert "git fetch --unshallow" in script["history"]
    assert "--changed-dependents=transitive lint check test" in script["verify"]
    assert (
        "python3.11 -m deploy.affected" in script["select"] and "/workspace/affected.txt" in script["select"]
    )
    assert "./pants --no-pantsd package" in script["package"] and "-m deploy.render" in script["package"]
    assert "docker push" in script["images"] and '"${_REGISTRY}/$$svc:${SHORT_SHA}"' in script["images"]
    # What tests/images build is what Cloud Build builds: one script.
    assert "build-support/engine/build_image.sh" in script["images"]
    assert config()["substitutions"]["_REGISTRY"] == "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}"
    # Every deploy is a canary: tagged, smoke-tested, then the traffic (build-support/deploy/canary.py).
    assert "build-support/deploy:canary" in script["package"]
    assert "canary.pex rollout" in script["deploy"] and '--tag="sha-${SHORT_SHA}"' in script["deploy"]
    assert '--traffic-steps="${_TRAFFIC_STEPS}"' in script["deploy"]


def test_named_files_and_programs_exist() -> None:
    text = step_text()
    assert (
        ROOT / "build-support" / "deploy" / "builder.Dockerfile"
    ).is_file() and "build-support/deploy/builder.Dockerfile" in text
    assert (ROOT / "build-support" / "engine" / "build_image.sh").is_file()
    programs = {module.__name__: module for module in (affected, canary, invokers, render)}
    # The canary runs as the PEX the package step builds (build-support/deploy:canary, in dist/).
    assert "dist/build-support.deploy/canary.pex" in text
    for name in set(re.findall(r"-m (deploy\.\w+)", text)):
        assert callable(getattr(programs.get(name), "main", None)), f"{name} is not a deploy program"


def test_the_default_network_is_one_render_accepts() -> None:
    declared = config()["substitutions"]
    script = " ".join(next(s for s in config()["steps"] if s["id"] == "package")["args"])
    assert '--vpc="${_VPC}" --network="${_NETWORK}" --subnet="${_SUBNET}"' in script
    assert declared["_VPC"] == "direct"  # `none` is the opt-out (README)
    Vpc(declared["_NETWORK"], declared["_SUBNET"])  # raises on a name Cloud Run would refuse
