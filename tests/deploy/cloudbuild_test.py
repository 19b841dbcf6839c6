"""cloudbuild.yaml: valid for Cloud Build (the schema check-jsonschema ships, offline), every substitution
declared or built in and handed to the scripts only through `env:` (checked against its pattern before use),
and the steps in the order the pipeline needs."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudbuild import config as build_config
from cloudbuild.runner import BuildFailed, Runner
from cloudbuild.substitutions import BUILT_IN as RUNNER_BUILT_IN

from deploy import affected, canary, invokers, render
from deploy.reach import Vpc
from tests.deploy.repo import ROOT

CLOUDBUILD = ROOT / "cloudbuild.yaml"
CHECK = ROOT / "build-support" / "deploy" / "check_substitutions.sh"
# Cloud Build's own substitutions (all builds, and builds started by a trigger).
BUILT_IN = {
    "PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID",
    "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "REF_NAME",
}  # fmt: skip
REFERENCE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
# A step's env entry handing one substitution to its script, under the substitution's own name.
HANDED = re.compile(r"(?P<name>_?[A-Z][A-Z0-9_]*)=\$\{(?P=name)\}")
# What a real build would give (a trigger's build on a push).
EXAMPLE_BUILT_IN = {
    **{name: "" for name in RUNNER_BUILT_IN},
    "PROJECT_ID": "demo-project",
    "PROJECT_NUMBER": "123456789012",
    "SHORT_SHA": "0a1b2c3",
    "COMMIT_SHA": "0a1b2c3" + "0" * 33,
}


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
        " ".join([step["name"], step.get("entrypoint", ""), *step.get("args", []), *step.get("env", [])])
        for step in config()["steps"]
    )


def references() -> set[str]:
    """Every substitution the steps name, with bash's `$$` (a literal `$`) taken out."""
    names = set()
    for match in REFERENCE.finditer(step_text().replace("$$", "")):
        names.add(match["braced"] if match["braced"] is not None else match["bare"])
    return names


def check(names: list[str], values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK), *names],
        env={"PATH": os.environ["PATH"], **values},
        capture_output=True,
        text=True,
        timeout=30,
    )


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


@pytest.mark.parametrize("step", config()["steps"], ids=lambda s: s["id"])
def test_substitutions_reach_scripts_only_through_env_and_are_checked_first(step: dict[str, Any]) -> None:
    # Cloud Build pastes a substitution into whatever text names it: in a script's text a value would run.
    # So no `$` of the args is Cloud Build's (each is `$$`, bash's own), and the values come as variables.
    for arg in step.get("args", []):
        assert "$" not in arg.replace("$$", ""), f"{step['id']}: a substitution pasted into a script: {arg}"
    handed = []
    for entry in step.get("env", []):
        match = HANDED.fullmatch(entry)
        assert match, f"{step['id']}: env {entry!r} is not NAME=${{NAME}}"
        handed.append(match["name"])
    script = "\n".join(step.get("args", []))
    used = sorted({n for n in re.findall(r"\$\$\{?(_?[A-Z][A-Z0-9_]*)", script)})
    assert used == sorted(handed), f"{step['id']}: the script reads {used}, its env hands {handed}"
    if handed:  # the script's first line checks every one it was handed, before any use
        first = script.split("\n", 1)[1].splitlines()[0] if script.startswith("-ceu\n") else ""
        assert first == "bash build-support/deploy/check_substitutions.sh " + " ".join(handed)


def test_a_substitution_value_never_runs(tmp_path: Path) -> None:
    # The whole cloudbuild.yaml, run by the local runner on a checkout holding what its first steps call.
    workspace = tmp_path / "workspace"
    (workspace / "build-support" / "deploy").mkdir(parents=True)
    shutil.copy(CLOUDBUILD, workspace)
    shutil.copy(CHECK, workspace / "build-support" / "deploy")
    git = ["git", "-C", str(workspace), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "--quiet"], check=True)
    subprocess.run([*git, "add", "--all"], check=True)
    subprocess.run([*git, "commit", "--quiet", "--message=x"], check=True)
    ran = tmp_path / "ran"
    build = build_config.load(
        CLOUDBUILD.read_text(), EXAMPLE_BUILT_IN, {"_BASE_REF": f"HEAD~1$(touch {ran})"}
    )
    out = io.StringIO()
    with pytest.raises(BuildFailed, match=r'build step 2 "pants-builder" \(verify\) failed'):
        Runner(build, workspace, {"PATH": os.environ["PATH"]}, out).run()
    assert not ran.exists()
    assert "ERROR: substitution _BASE_REF=HEAD~1\\$\\(touch\\ " in out.getvalue()
    assert "does not match the pattern ^[A-Za-z0-9]" in out.getvalue()


def test_every_substitution_has_a_pattern_its_defaults_match() -> None:
    build = build_config.load(CLOUDBUILD.read_text(), EXAMPLE_BUILT_IN, {})
    names = sorted(references() - {"COMMIT_SHA"})
    result = check(names, {n: build.substitutions[n] for n in names})
    assert (result.returncode, result.stderr) == (0, "")
    # The local runner's registry and a manual run's choices.
    local = {"_REGISTRY": "127.0.0.1:40123/local-project/mesh", "_SERVICES": "ping,routeguide",
             "_BASE_REF": "origin/main~3", "_TRAFFIC_STEPS": "10,50,100", "_VERIFY": "none", "_VPC": "none"}  # fmt: skip
    assert check(sorted(local), local).returncode == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("_BASE_REF", "HEAD~1$(touch x)"),
        ("_BASE_REF", "--output=/tmp/x"),
        ("_BASE_REF", "HEAD~1 ; id"),
        ("_SERVICES", "ping`id`"),
        ("_SERVICES", "ping routeguide"),
        ("_REGION", "europe-west1\nkind: Pod"),
        ("_REGISTRY", "-v/x"),
        ("_TRAFFIC_STEPS", "10,${IFS}50"),
        ("_VERIFY", "changed; id"),
        ("_VPC", "public"),
        ("_NETWORK", "Mesh_1"),
        ("SHORT_SHA", ""),
        ("PROJECT_ID", "demo project"),
    ],
)
def test_a_value_off_its_pattern_stops_the_step_naming_the_substitution(name: str, value: str) -> None:
    result = check(["_VERIFY", name], {"_VERIFY": "changed", name: value})
    assert result.returncode == 1
    assert result.stderr.startswith(f"ERROR: substitution {name}=")
    assert "does not match the pattern ^" in result.stderr


def test_a_substitution_not_handed_or_without_a_pattern_is_an_error() -> None:
    missing = check(["_BASE_REF"], {})
    assert missing.returncode == 2
    assert "substitution _BASE_REF is not in this step's env: add _BASE_REF=${_BASE_REF}" in missing.stderr
    unknown = check(["_OTHER"], {"_OTHER": "x"})
    assert unknown.returncode == 2 and "no pattern for substitution _OTHER" in unknown.stderr


def test_pipeline_steps_in_order() -> None:
    steps = {step["id"]: step for step in config()["steps"]}
    assert list(steps) == [
        "history", "builder", "verify", "select", "package", "images", "manifests", "deploy"
    ]  # fmt: skip
    script = {name: " ".join(step.get("args", [])) for name, step in steps.items()}
    assert "git fetch --unshallow" in script["history"]
    assert "--changed-dependents=transitive lint check test" in script["verify"]
    # The contract check compares with what is deployed, whatever _VERIFY says.
    contracts = './pants --no-pantsd run build-support/contracts -- --against="$$_BASE_REF"'
    assert contracts in script["verify"] and script["verify"].index(contracts) < script["verify"].index(
        '_VERIFY" = none'
    )
    assert (
        "python3.11 -m deploy.affected" in script["select"] and "/workspace/affected.txt" in script["select"]
    )
    assert "./pants --no-pantsd package" in script["package"] and "-m deploy.render" in script["manifests"]
    assert "docker push" in script["images"] and '"$$_REGISTRY/$$svc:$$SHORT_SHA"' in script["images"]
    # The manifests name each image by the digest the push gave it.
    assert (
        "/workspace/images.txt" in script["images"]
        and "--images=/workspace/images.txt" in script["manifests"]
    )
    # What tests/images build is what Cloud Build builds: one script.
    assert "build-support/engine/build_image.sh" in script["images"]
    assert config()["substitutions"]["_REGISTRY"] == "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}"
    # Every deploy is a canary: tagged, smoke-tested, then the traffic (build-support/deploy/canary.py).
    assert "build-support/deploy:canary" in script["package"]
    assert "canary.pex rollout" in script["deploy"] and '--tag="sha-$$SHORT_SHA"' in script["deploy"]
    assert '--traffic-steps="$$_TRAFFIC_STEPS"' in script["deploy"]
    # Then the invokers of what was deployed made what services/invokers.yaml says (added and removed).
    assert "build-support/deploy:invokers" in script["package"] and "invokers.pex" in script["deploy"]


def test_named_files_and_programs_exist() -> None:
    text = step_text()
    assert (
        ROOT / "build-support" / "deploy" / "builder.Dockerfile"
    ).is_file() and "build-support/deploy/builder.Dockerfile" in text
    assert (ROOT / "build-support" / "engine" / "build_image.sh").is_file()
    programs = {module.__name__: module for module in (affected, canary, invokers, render)}
    # The canary runs as the PEX the package step builds (build-support/deploy:canary, in dist/).
    assert "dist/build-support.deploy/canary.pex" in text and "dist/build-support.deploy/invokers.pex" in text
    for name in set(re.findall(r"-m (deploy\.\w+)", text)):
        assert callable(getattr(programs.get(name), "main", None)), f"{name} is not a deploy program"


def test_the_default_network_is_one_render_accepts() -> None:
    declared = config()["substitutions"]
    script = " ".join(next(s for s in config()["steps"] if s["id"] == "manifests")["args"])
    assert '--vpc="$$_VPC" --network="$$_NETWORK" --subnet="$$_SUBNET"' in script
    assert declared["_VPC"] == "direct"  # `none` is the opt-out (README)
    Vpc(declared["_NETWORK"], declared["_SUBNET"])  # raises on a name Cloud Run would refuse
