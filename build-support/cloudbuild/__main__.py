"""Run cloudbuild.yaml here as Cloud Build runs it on a push (README.md beside this file):

    ./pants run build-support/cloudbuild:local -- [--substitutions=_SERVICES=all] [--record=FILE]

The build is of the checkout's HEAD (committed work only), cloned into a temporary /workspace. Around it the
runner starts what Google would provide: a container engine (build-support/engine), a real Docker registry on
loopback for Artifact Registry (`_REGISTRY` points at it), and a recording Cloud Run stand-in behind the
steps' `gcloud` (cloudbuild.gcloud); it stops all of them when the build ends. Exit status 0 when the build
succeeds, 1 when a step fails (named on the last line), 2 for an invalid build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from cloudbuild import checkout, config, gcloud, registry
from cloudbuild.cloudrun import CloudRun
from cloudbuild.runner import BuildFailed, Runner
from cloudbuild.substitutions import SubstitutionError

from engine import base_image, daemon

INVALID = 2


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cloudbuild", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY", ".")),
        help="the git checkout to build (default: the repository ./pants runs in)",
    )
    parser.add_argument(
        "--config", default="cloudbuild.yaml", help="the build config, relative to the checkout"
    )
    parser.add_argument(
        "--substitutions", action="append", default=[], help="_NAME=VALUE,... (gcloud's syntax)"
    )
    parser.add_argument("--project", default="local-project", help="PROJECT_ID")
    parser.add_argument("--project-number", default="123456789012", help="PROJECT_NUMBER")
    parser.add_argument("--location", default="europe-west1", help="LOCATION, the build's region")
    parser.add_argument(
        "--record", type=Path, help="also copy the Cloud Run stand-in's record (JSON lines) here"
    )
    parser.add_argument(
        "--state",
        type=Path,
        help="keep the project (the registry's images, the Cloud Run services"
        " and their traffic) here between builds, as a real project keeps them (default: none kept)",
    )
    parser.add_argument("--keep-workspace", action="store_true", help="leave the workspace folder for a look")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    root = args.root.resolve()
    project = checkout.Project(args.project, args.project_number, args.location)
    began = time.monotonic()
    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="cloudbuild-"))
        if not args.keep_workspace:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        try:
            engine = daemon.ensure()
        except daemon.NoEngine as error:
            say(f"cloudbuild: {error}")
            return daemon_unavailable()
        if engine.started:
            stack.callback(daemon.stop)
        base_image.ensure(engine)
        state = args.state.resolve() if args.state else scratch / "state"
        local_registry = registry.start(state / "registry")
        stack.callback(local_registry.stop)
        overrides = {"_REGISTRY": f"{local_registry.address}/${{PROJECT_ID}}/${{_REPOSITORY}}"}
        try:
            overrides.update(config.parse_pairs(args.substitutions))
            build = config.load(
                (root / args.config).read_text(), checkout.built_in(root, project, args.config), overrides
            )
        except (SubstitutionError, config.ConfigError) as error:
            say(f"ERROR: {error}")
            return INVALID
        record = args.record.resolve() if args.record else scratch / "record.jsonl"
        record.write_text("")
        cloud_run = CloudRun(
            state / "cloudrun", project.number, say, record, engine=engine, region=project.location
        )
        stack.callback(cloud_run.close)
        # What the build left in the registry, for the record.
        stack.callback(
            lambda: cloud_run.record(
                "registry", images=local_registry.images(), digests=local_registry.digests()
            )
        )
        control = gcloud.serve(cloud_run)
        stack.callback(control.shutdown)
        tools = scratch / "bin"
        gcloud.write_client(tools, sys.executable, sys.path)
        (tools / "python3.11").symlink_to(sys.executable)  # the builder image's python3.11 (with PyYAML)
        workspace = checkout.clone(root, scratch / "workspace")
        env = {
            **engine.docker_env(),
            "PATH": f"{tools}{os.pathsep}{engine.docker_env()['PATH']}",
            gcloud.URL_VARIABLE: f"http://127.0.0.1:{control.server_address[1]}",
            # The services' URLs reach the local Cloud Run's front end, whose certificate the development CA signed.
            **cloud_run.step_env(),
        }
        say(
            f"cloudbuild: {build.substitutions['SHORT_SHA']} of {root.name} in {workspace}; registry {local_registry.address}"
        )
        try:
            results = Runner(build, workspace, env).run()
        except BuildFailed as failure:
            say(f"ERROR: {failure}")
            return 1
        finally:
            say(f"cloudbuild: {time.monotonic() - began:.0f} s; the stand-in's record: {record}")
        for result in results.values():
            say(f"  {result.step.id:12} {result.status:9} {result.seconds:6.1f} s")
    return 0


def daemon_unavailable() -> int:
    return 3  # engine's NO_ENGINE


if __name__ == "__main__":
    sys.exit(main())
