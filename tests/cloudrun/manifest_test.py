"""What a revision needs to run, read from its manifest with Cloud Run's defaults (minScale's local one), and
the values Cloud Run refuses, each named."""

from __future__ import annotations

import pytest
import yaml

from cloudrun.manifest import InvalidManifest, parse

IMAGE = "127.0.0.1:5000/demo-project/mesh/ping@sha256:" + "ab" * 32


def manifest(**template: object) -> str:
    annotations = template.pop("annotations", None)
    return yaml.safe_dump({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "ping"},
        "spec": {"template": {
            "metadata": {"annotations": annotations} if annotations else {},
            "spec": {"containers": [{"image": IMAGE}], **template},
        }},
    })  # fmt: skip


def test_what_a_manifest_leaves_out_is_cloud_runs_default() -> None:
    spec = parse(manifest())
    assert (spec.concurrency, spec.timeout_s, spec.min_scale, spec.max_scale) == (80, 300, 1, 100)
    assert spec.folder == "ping"
    given = parse(manifest(containerConcurrency=250, timeoutSeconds=3600, annotations={
        "autoscaling.knative.dev/minScale": "0", "autoscaling.knative.dev/maxScale": "3"}))  # fmt: skip
    assert (given.concurrency, given.timeout_s, given.min_scale, given.max_scale) == (250, 3600, 0, 3)


@pytest.mark.parametrize(
    ("template", "refused"),
    [
        ({"containerConcurrency": 0}, "containerConcurrency 0 must be an integer 1-1000"),
        ({"timeoutSeconds": 3601}, "timeoutSeconds 3601 must be an integer 1-3600"),
        ({"annotations": {"autoscaling.knative.dev/maxScale": "many"}}, "maxScale 'many' must be an integer"),
        (
            {
                "annotations": {
                    "autoscaling.knative.dev/minScale": "5",
                    "autoscaling.knative.dev/maxScale": "2",
                }
            },
            "minScale 5 is above autoscaling.knative.dev/maxScale 2",
        ),
    ],
)
def test_values_cloud_run_refuses_are_named(template: dict[str, object], refused: str) -> None:
    with pytest.raises(InvalidManifest, match=refused):
        parse(manifest(**template))
