"""Runs a Build's steps on this machine as Cloud Build runs them in its workers.

Each step starts once the steps it waits for have succeeded (every earlier step when it names none, none with
`waitFor: ["-"]`), so independent steps run in parallel. A step runs its builder's program on the host (the
step images are unreachable here, and the host has the same tools): its `entrypoint`, else the builder's own
(gcr.io/cloud-builders/docker -> docker), with its `args`, `env`, `dir` (under the workspace) and `timeout`.
The path `/workspace` in a step's args, env and dir means the build's workspace folder. A step that builds
the image later steps name (`docker build --tag=pants-builder` for `name: pants-builder`) is skipped: those
steps run on the host. The first step that fails (or times out) stops the build; steps still running are
stopped and the build fails naming that step, with Cloud Build's wording.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cloudbuild.config import Build, Step

WORKSPACE = "/workspace"
# Builders whose image's entrypoint is the tool of the same name.
BUILDER_ENTRYPOINT = re.compile(r"gcr\.io/cloud-builders/(?P<tool>[a-z0-9-]+)(?::.*)?")
STOP_GRACE_S = 10.0


class BuildFailed(Exception):
    def __init__(self, step: Step, reason: str) -> None:
        super().__init__(f'build step {step.index} "{step.name}" ({step.id}) failed: {reason}')
        self.step = step


@dataclass
class StepResult:
    step: Step
    status: str  # SUCCESS, FAILURE, TIMEOUT, CANCELLED, SKIPPED
    seconds: float = 0.0
    note: str = ""


@dataclass
class Runner:
    build: Build
    workspace: Path
    env: Mapping[str, str]  # the host environment every step starts from (PATH with the stand-ins first)
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    results: dict[str, StepResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._failed: BuildFailed | None = None

    def run(self) -> dict[str, StepResult]:
        """Every step, in waitFor order; raises BuildFailed naming the first step that failed."""
        deadline = time.monotonic() + self.build.timeout_s
        threads = [
            threading.Thread(target=self._run_when_ready, args=(s,), daemon=True) for s in self.build.steps
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    timeout = f"build timed out after {self.build.timeout_s:g}s"
                    self._fail(BuildFailed(self.build.steps[0], timeout))
                    break
        except BaseException:  # the runner itself is stopped (Ctrl-C, a test's timeout): so are its steps
            self._fail(BuildFailed(self.build.steps[0], "build cancelled"))
            raise
        finally:
            for thread in threads:
                thread.join(STOP_GRACE_S + 5)
        if self._failed:
            raise self._failed
        return self.results

    def _run_when_ready(self, step: Step) -> None:
        needs = self.build.dependencies(step)
        with self._lock:
            self._lock.wait_for(lambda: self._failed is not None or all(d.id in self.results for d in needs))
            if self._failed is not None:
                self.results[step.id] = StepResult(step, "CANCELLED")
                self._lock.notify_all()
                return
        result = self._execute(step)
        with self._lock:
            self.results[step.id] = result
            self._lock.notify_all()
        if result.status not in ("SUCCESS", "SKIPPED"):
            self._fail(BuildFailed(step, result.note))

    def _fail(self, failure: BuildFailed) -> None:
        with self._lock:
            if self._failed is None:
                self._failed = failure
            self._lock.notify_all()
            running = list(self._processes.values())
        for process in running:  # Cloud Build cancels the steps still running
            _signal_group(process, signal.SIGTERM)

    def _execute(self, step: Step) -> StepResult:
        began = time.monotonic()
        skip = self._skip_reason(step)
        if skip:
            self._say(step, f"skipped: {skip}")
            return StepResult(step, "SKIPPED", note=skip)
        try:
            argv = [self._entrypoint(step), *(self._local(a) for a in step.args)]
        except BuildFailed as error:
            return StepResult(step, "FAILURE", note=str(error).split("failed: ", 1)[1])
        cwd = self.workspace / self._local(step.dir).removeprefix(str(self.workspace)).lstrip("/")
        env = dict(self.env)
        for item in step.env:
            key, _, value = item.partition("=")
            env[key] = self._local(value)
        self._say(step, f"running {step.name} ({argv[0]}) in {cwd}")
        try:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            return StepResult(step, "FAILURE", note=f"cannot start {argv[0]}: {error.strerror}")
        with self._lock:
            self._processes[step.id] = process
        pump = threading.Thread(target=self._pump, args=(step, process), daemon=True)
        pump.start()
        timeout = step.timeout_s or self.build.timeout_s
        try:
            code = process.wait(timeout)
            status = "SUCCESS" if code == 0 else "FAILURE"
            note = "" if code == 0 else f"step exited with non-zero status: {code}"
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            status, note = "TIMEOUT", f"step timed out after {timeout:g}s"
        pump.join(5)
        with self._lock:
            del self._processes[step.id]
            if self._failed is not None and status == "FAILURE" and self._failed.step != step:
                status, note = "CANCELLED", "cancelled: another step failed"
        seconds = time.monotonic() - began
        self._say(step, f"{status} in {seconds:.1f} s")
        return StepResult(step, status, seconds, note)

    def _skip_reason(self, step: Step) -> str | None:
        if BUILDER_ENTRYPOINT.fullmatch(step.name) and step.args[:1] == ("build",):
            tags = {m[1] for a in step.args if (m := re.fullmatch(r"(?:--tag|-t)=(.+)", a))}
            users = [s.id for s in self.build.steps if s.name in tags]
            if users:
                return f"builds the step image of {', '.join(users)}, which run on the host here"
        return None

    def _entrypoint(self, step: Step) -> str:
        if step.entrypoint:
            return step.entrypoint
        builder = BUILDER_ENTRYPOINT.fullmatch(step.name)
        if builder:
            return builder["tool"]
        raise BuildFailed(step, f"image {step.name} has no entrypoint this runner knows; give the step one")

    def _local(self, text: str) -> str:
        return re.sub(rf"{WORKSPACE}(?=/|\b|$)", str(self.workspace), text)

    def _pump(self, step: Step, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._say(step, line.decode(errors="replace").rstrip("\n"))

    def _say(self, step: Step, line: str) -> None:
        with self._lock:
            print(f'Step #{step.index} - "{step.id}": {line}', file=self.out, flush=True)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
