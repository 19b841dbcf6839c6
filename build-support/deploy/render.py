"""Fills a service folder's Cloud Run manifests in for one project, ready for `gcloud run services replace`.

    python -m deploy.render --project-id P --project-number N --region R --images FILE \
        --vpc direct --network NET --subnet SUB --out DIR

writes DIR/<cloud run name>.yaml for each services/<service>/service*.yaml of the services FILE names (lines
`<service> <image>@sha256:<digest>`, as cloudbuild.yaml's images step writes them after the push; ping:
ping.yaml and ping-upstream.yaml). The manifests name ${PROJECT_ID} (service-account emails),
${PROJECT_NUMBER} and ${REGION} (the deterministic https://<service>-<number>.<region>.run.app URLs of the
service and its upstreams) and ${IMAGE}, which must name the image by digest: a tag can be moved after the
push, a digest is the pushed image itself. Any other ${...} is an error, so a typo cannot reach Cloud Run. Then services/invokers.yaml's reach goes in (deploy/reach.py): each service's ingress, and
Direct VPC egress through NET/SUB for the callers of inside-only services; `--vpc none` renders every service
`ingress: all` with no VPC.
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from deploy.layout import INVOKERS_FILE, cloud_run_name, deployable_services, manifests
from deploy.reach import Topology, Vpc, annotate

# Each value lands inside a YAML scalar: a strict shape keeps it from changing the document's structure.
VALUE_PATTERNS = {
    "PROJECT_ID": re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]"),
    "PROJECT_NUMBER": re.compile(r"[0-9]{1,20}"),
    "REGION": re.compile(r"[a-z]+-[a-z]+[0-9]+"),
    "IMAGE": re.compile(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}"),
}
WHAT = {"IMAGE": "image named by digest (REGISTRY/NAME@sha256:...)"}


def check_values(values: Mapping[str, str]) -> None:
    for name, pattern in VALUE_PATTERNS.items():
        if name not in values:
            raise ValueError(f"no value for {name}")
        if not pattern.fullmatch(values[name]):
            what = WHAT.get(name, name.lower().replace("_", " "))
            raise ValueError(f"{name} {values[name]!r} does not look like a {what}")


def load_images(text: str) -> dict[str, str]:
    """`<service> <image>` lines -> {service: image}; a line of another shape raises ValueError."""
    images = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or fields[0] in images:
            raise ValueError(
                f"line {number}: expected one `<service> <image>` line per service, got {line!r}"
            )
        images[fields[0]] = fields[1]
    return images


def render(text: str, values: Mapping[str, str]) -> str:
    """text with every ${NAME} replaced; a placeholder outside VALUE_PATTERNS raises ValueError."""
    template = string.Template(text)
    unknown = sorted(set(template.get_identifiers()) - set(VALUE_PATTERNS))
    if unknown or not template.is_valid():
        raise ValueError(f"unknown or malformed placeholder(s) {', '.join(unknown) or '(a stray $)'}")
    check_values(values)
    return template.substitute(values)


def render_manifest(text: str, values: Mapping[str, str], topology: Topology, vpc: Vpc | None) -> str:
    """render(), then the service's ingress and egress annotated from topology."""
    document = yaml.safe_load(render(text, values))
    account = document["spec"]["template"]["spec"]["serviceAccountName"].split("@")[0]
    annotate(document, topology.reach(document["metadata"]["name"], account, vpc))
    return yaml.safe_dump(document, sort_keys=False, width=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project-id", required=True)
    parser.add_argument("--project-number", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="lines `<service> <image>@sha256:<digest>`: the services to render and their pushed images",
    )
    parser.add_argument(
        "--vpc",
        choices=["direct", "none"],
        required=True,
        help="direct: ingress as services/invokers.yaml says, callers of inside-only services egress through"
        " --network/--subnet; none: no VPC, every service ingress all",
    )
    parser.add_argument("--network", help="VPC network name (with --vpc direct)")
    parser.add_argument(
        "--subnet", help="its subnet in --region, with Private Google Access (with --vpc direct)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the rendered manifests")
    parser.add_argument(
        "--root", type=Path, default=Path.cwd(), help="repo root (default: the current directory)"
    )
    args = parser.parse_args(argv)

    try:
        images = load_images(args.images.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"--images {args.images}: {error}")
    unknown = sorted(set(images) - set(deployable_services(args.root)))
    if unknown:
        parser.error(f"no Cloud Run manifest for {', '.join(unknown)} under {args.root / 'services'}")
    vpc = None
    if args.vpc == "direct":
        if not (args.network and args.subnet):
            parser.error("--vpc direct needs --network and --subnet")
        try:
            vpc = Vpc(args.network, args.subnet)
        except ValueError as error:
            parser.error(str(error))
    topology_file = args.root / INVOKERS_FILE
    try:
        topology = Topology.load(topology_file.read_text())
    except ValueError as error:
        parser.error(f"{topology_file}: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    for service, image in images.items():
        values = {
            "PROJECT_ID": args.project_id,
            "PROJECT_NUMBER": args.project_number,
            "REGION": args.region,
            "IMAGE": image,
        }
        for manifest in manifests(args.root, service):
            try:
                rendered = render_manifest(manifest.read_text(), values, topology, vpc)
            except ValueError as error:
                parser.error(f"{manifest}: {error}")
            target = args.out / f"{cloud_run_name(manifest)}.yaml"
            target.write_text(rendered)
            print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
