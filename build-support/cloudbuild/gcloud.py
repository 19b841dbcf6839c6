"""The `gcloud` the steps find on PATH: the commands the pipeline runs, parsed as gcloud parses them, on the
Cloud Run stand-in (cloudbuild.cloudrun).

    gcloud run services replace FILE --project=P --region=R
    gcloud run services describe NAME --project=P --region=R --format=json
    gcloud run services update-traffic NAME [--to-revisions=R=N,...] [--to-tags=T=N,...] [--to-latest]
        [--update-tags=T=R,...] [--remove-tags=T,...] --project=P --region=R
    gcloud run services add-iam-policy-binding NAME --member=serviceAccount:EMAIL --role=ROLE --project=P --region=R
    gcloud run services remove-iam-policy-binding NAME --member=MEMBER --role=ROLE --project=P --region=R
    gcloud run services get-iam-policy NAME --project=P --region=R --format=json
    gcloud auth print-identity-token [--audiences=AUD] [--impersonate-service-account=SA] [--include-email]

Anything else (another command, an unknown flag, a missing --region) fails as gcloud fails: exit status 1 (2
for usage) and `ERROR: (gcloud.GROUP.COMMAND) ...` on stderr. The program on PATH is a small client
(`python -m cloudbuild.gcloud_client`) that hands its command line to the runner's stand-in over loopback
(CLOUDRUN_STANDIN_URL), so every revision it starts outlives the command, as on Cloud Run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

from cloudbuild.cloudrun import CloudRun, CloudRunError
from cloudbuild.gcloud_client import URL_VARIABLE, command_name

from cloudrun.manifest import InvalidManifest

__all__ = ["URL_VARIABLE", "answer", "serve", "write_client"]


@dataclass(frozen=True)
class Answer:
    code: int
    stdout: str = ""
    stderr: str = ""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, text.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _percents(text: str) -> dict[str, int]:
    percents = {}
    for key, value in _pairs(text).items():
        if not value.isdigit() or int(value) > 100:
            raise UsageError(f"{key}={value}: a percentage is an integer 0-100")
        percents[key] = int(value)
    return percents


def parser() -> _Parser:
    root = _Parser(prog="gcloud", add_help=False)
    groups = root.add_subparsers(dest="group", required=True, parser_class=_Parser)
    run = groups.add_parser("run", add_help=False).add_subparsers(
        dest="subgroup", required=True, parser_class=_Parser
    )
    services = run.add_parser("services", add_help=False).add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    def command(name: str, *, target: str) -> _Parser:
        sub = services.add_parser(name, add_help=False)
        sub.add_argument(target)
        sub.add_argument("--project", required=True)
        sub.add_argument("--region", required=True)
        sub.add_argument("--platform", choices=["managed"], default="managed")
        sub.add_argument("--quiet", "-q", action="store_true")
        return sub

    command("replace", target="file")
    describe = command("describe", target="service")
    describe.add_argument("--format", required=True, choices=["json"], help="what the pipeline parses")
    traffic = command("update-traffic", target="service")
    traffic.add_argument("--to-revisions", type=_percents, default={})
    traffic.add_argument("--to-tags", type=_percents, default={})
    traffic.add_argument("--to-latest", action="store_true")
    traffic.add_argument("--update-tags", type=_pairs, default={})
    traffic.add_argument("--remove-tags", type=lambda t: [x for x in t.split(",") if x], default=[])
    for change in ("add-iam-policy-binding", "remove-iam-policy-binding"):
        binding = command(change, target="service")
        binding.add_argument("--member", required=True)
        binding.add_argument("--role", required=True)
    policy = command("get-iam-policy", target="service")
    policy.add_argument("--format", required=True, choices=["json"], help="what the pipeline parses")
    auth = groups.add_parser("auth", add_help=False).add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    token = auth.add_parser("print-identity-token", add_help=False)
    token.add_argument("--audiences", default="32555940559.apps.googleusercontent.com")
    token.add_argument("--impersonate-service-account", required=True, help="the stand-in has no user login")
    token.add_argument("--include-email", action="store_true")
    return root


def answer(cloud_run: CloudRun, argv: Sequence[str], cwd: Path) -> Answer:
    """Run one gcloud command line on the stand-in; every command is recorded, refused ones too."""
    name = command_name(argv)
    try:
        args = parser().parse_args(list(argv))
    except UsageError as error:
        cloud_run.record("refused", argv=list(argv), reason=str(error))
        return Answer(2, stderr=f"ERROR: ({name}) {error}\n")
    try:
        if args.group == "auth":
            return Answer(
                0, cloud_run.identity_token(args.audiences, args.impersonate_service_account) + "\n"
            )
        if args.command == "replace":
            text = (cwd / args.file).read_text()
            return Answer(0, stderr="\n".join(cloud_run.replace(text, args.region)) + "\n")
        if args.command == "add-iam-policy-binding":
            return Answer(0, stderr=cloud_run.add_binding(args.service, args.member, args.role) + "\n")
        if args.command == "remove-iam-policy-binding":
            return Answer(0, stderr=cloud_run.remove_binding(args.service, args.member, args.role) + "\n")
        if args.command == "get-iam-policy":
            return Answer(0, json.dumps(cloud_run.iam_policy(args.service), indent=2) + "\n")
        if args.command == "describe":
            return Answer(0, json.dumps(cloud_run.describe(args.service), indent=2) + "\n")
        changes = {
            k: getattr(args, k)
            for k in ("to_revisions", "to_tags", "to_latest", "update_tags", "remove_tags")
        }
        if not any(changes.values()):
            raise UsageError(
                "at least one of --to-revisions, --to-tags, --to-latest, --update-tags, --remove-tags"
            )
        return Answer(0, stderr="\n".join(cloud_run.update_traffic(args.service, changes)) + "\n")
    except (CloudRunError, InvalidManifest, UsageError, OSError) as error:
        reason = f"manifest {args.file}: {error}" if isinstance(error, InvalidManifest) else str(error)
        cloud_run.record("failed", argv=list(argv), reason=reason)
        return Answer(1, stderr=f"ERROR: ({name}) {reason}\n")


def serve(cloud_run: CloudRun) -> ThreadingHTTPServer:
    """The stand-in's loopback endpoint for the `gcloud` clients; stop it with shutdown()."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            result = answer(cloud_run, request["argv"], Path(request["cwd"]))
            body = json.dumps(result.__dict__).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_client(bin_dir: Path, python: str, path: Sequence[str]) -> Path:
    """bin_dir/gcloud: this module's client on the given interpreter and import path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    program = bin_dir / "gcloud"
    program.write_text(
        "#!/bin/sh\n# The runner's Cloud Run stand-in (cloudbuild.gcloud); written per build.\n"
        f"PYTHONPATH='{os.pathsep.join(path)}' exec '{python}' -m cloudbuild.gcloud_client \"$@\"\n"
    )
    program.chmod(0o755)
    return program
