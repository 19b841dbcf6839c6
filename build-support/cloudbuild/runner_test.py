from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from cloudbuild.config import ConfigError, load
from cloudbuild.runner import BuildFailed, Runner
from cloudbuild.substitutions import SubstitutionError

BUILT_IN = {"PROJECT_ID": "demo", "SHORT_SHA": "0a1b2c3"}


def run(tmp_path: Path, text: str, overrides: dict[str, str] | None = None) -> tuple[str, Runner]:
    build = load(text, BUILT_IN, overrides or {})
    out = io.StringIO()
    runner = Runner(build, tmp_path, {"PATH": "/usr/bin:/bin"}, out)
    try:
        runner.run()
    finally:
        (tmp_path / "log").write_text(out.getvalue())
    return out.getvalue(), runner


def test_steps_share_the_workspace_with_substitutions_env_and_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    config = """
substitutions: {_GREETING: hello}
steps:
  - id: write
    name: gcr.io/cloud-builders/git
    entrypoint: bash
    args: [-ceu, 'echo "${_GREETING} $$WHO $SHORT_SHA $$(pwd)" > /workspace/out.txt']
    env: [WHO=world]
    dir: sub
  - id: read
    name: gcr.io/cloud-builders/git
    entrypoint: cat
    args: [/workspace/out.txt]
"""
    log, _ = run(tmp_path, config)
    assert (tmp_path / "out.txt").read_text() == f"hello world 0a1b2c3 {tmp_path}/sub\n"
    assert f'Step #1 - "read": hello world 0a1b2c3 {tmp_path}/sub' in log


def test_wait_for_start_runs_in_parallel_and_default_waits_for_all_earlier(tmp_path: Path) -> None:
    config = """
steps:
  - {id: a, name: x, entrypoint: bash, args: [-c, 'sleep 1; date +%s.%N > /workspace/a']}
  - {id: b, name: x, entrypoint: bash, waitFor: ["-"], args: [-c, 'sleep 1; date +%s.%N > /workspace/b']}
  - {id: c, name: x, entrypoint: bash, args: [-c, 'test -f /workspace/a && test -f /workspace/b']}
"""
    began = time.monotonic()
    run(tmp_path, config)
    # a and b overlap (both slept 1 s); c ran after both.
    assert time.monotonic() - began < 1.9
    assert abs(float((tmp_path / "a").read_text()) - float((tmp_path / "b").read_text())) < 0.5


def test_a_failed_step_fails_the_build_naming_it_and_later_steps_never_run(tmp_path: Path) -> None:
    config = """
steps:
  - {id: ok, name: gcr.io/cloud-builders/docker, entrypoint: "true"}
  - {id: broken, name: gcr.io/cloud-builders/docker, entrypoint: bash, args: [-c, 'exit 3']}
  - {id: after, name: gcr.io/cloud-builders/docker, entrypoint: bash, args: [-c, 'touch /workspace/ran']}
"""
    with pytest.raises(
        BuildFailed,
        match=r'build step 1 "gcr.io/cloud-builders/docker" \(broken\) failed: step exited with non-zero status: 3',
    ):
        run(tmp_path, config)
    assert not (tmp_path / "ran").exists()


def test_a_step_past_its_timeout_is_stopped_and_fails_the_build(tmp_path: Path) -> None:
    config = "steps:\n  - {id: slow, name: x, entrypoint: sleep, args: ['30'], timeout: 1s}\n"
    began = time.monotonic()
    with pytest.raises(BuildFailed, match="slow.*timed out after 1s"):
        run(tmp_path, config)
    assert time.monotonic() - began < 15


def test_builders_default_entrypoint_and_step_image_builds_are_skipped(tmp_path: Path) -> None:
    config = """
steps:
  - {id: image, name: gcr.io/cloud-builders/docker, args: [build, --tag=my-builder, .]}
  - {id: use, name: my-builder, entrypoint: bash, args: [-c, 'touch /workspace/used']}
  - {id: git, name: gcr.io/cloud-builders/git, args: [--version]}
"""
    log, runner = run(tmp_path, config)
    assert runner.results["image"].status == "SKIPPED" and "builds the step image of use" in log
    assert (tmp_path / "used").exists() and "git version" in log
    with pytest.raises(BuildFailed, match="no entrypoint this runner knows"):
        run(tmp_path, "steps:\n  - {id: bare, name: my-builder, args: [x]}\n")


def test_invalid_configs_fail_before_any_step(tmp_path: Path) -> None:
    with pytest.raises(SubstitutionError, match='"_UNUSED"'):
        run(tmp_path, "substitutions: {_UNUSED: x}\nsteps:\n  - {name: x, entrypoint: 'true'}\n")
    with pytest.raises(ConfigError, match='waits for unknown step "later"'):
        run(
            tmp_path,
            "steps:\n  - {name: x, entrypoint: 'true', waitFor: [later]}\n  - {id: later, name: x}\n",
        )
    loose = "options: {substitutionOption: ALLOW_LOOSE}\nsubstitutions: {_UNUSED: x}\nsteps:\n  - {name: x, entrypoint: bash, args: [-c, 'test -z \"${_NONE}\"']}\n"
    run(tmp_path, loose)
