"""build-support/deploy/render.py: placeholders filled in, and nothing unexpected reaches a manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.reach import INGRESS, VPC_EGRESS
from deploy.render import main, render
from tests.deploy.repo import ROOT

PING = "europe-west1-docker.pkg.dev/demo-project/mesh/ping@sha256:" + "ab" * 32
VALUES = {
    "PROJECT_ID": "demo-project",
    "PROJECT_NUMBER": "123456789012",
    "REGION": "europe-west1",
    "IMAGE": PING,
}


def test_fills_in_every_placeholder() -> None:
    text = "image: ${IMAGE}\nurl: https://ping-${PROJECT_NUMBER}.${REGION}.run.app\nsa: x@${PROJECT_ID}.iam\n"
    assert render(text, VALUES) == (
        f"image: {PING}\n" "url: https://ping-123456789012.europe-west1.run.app\nsa: x@demo-project.iam\n"
    )


@pytest.mark.parametrize("text", ["value: ${PROJECT}\n", "value: $REGON\n", "cost: $5\n"])
def test_unknown_or_malformed_placeholder_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        render(text, VALUES)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REGION", "europe-west1\nkind: Pod"),
        ("PROJECT_NUMBER", "12a"),
        ("PROJECT_ID", "Demo Project"),
        ("IMAGE", "ping:latest"),
        # A tag can be moved after the push: the deployed image is named by digest.
        ("IMAGE", "europe-west1-docker.pkg.dev/demo-project/mesh/ping:0a1b2c3"),
        ("IMAGE", "europe-west1-docker.pkg.dev/demo-project/mesh/ping@sha256:abc"),
    ],
)
def test_values_that_could_bend_the_yaml_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        render("a: ${REGION}\n", {**VALUES, name: value})


def test_a_missing_value_is_an_error() -> None:
    values = dict(VALUES)
    del values["IMAGE"]
    with pytest.raises(ValueError, match="no value for IMAGE"):
        render("a: b\n", values)


def run(out: Path, *args: str, images: str = f"ping {PING}\n") -> int:
    out.parent.joinpath("images.txt").write_text(images)
    return main(
        [
            "--project-id=demo-project",
            "--project-number=123456789012",
            "--region=europe-west1",
            f"--images={out.parent / 'images.txt'}",
            f"--root={ROOT}",
            f"--out={out}",
            *args,
        ]
    )


def test_writes_each_cloud_run_service_of_a_folder_with_its_reach_and_pushed_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(out, "--vpc=direct", "--network=mesh", "--subnet=mesh") == 0
    written = {p.stem: yaml.safe_load(p.read_text()) for p in out.iterdir()}
    assert set(written) == {"ping", "ping-upstream"}
    assert written["ping-upstream"]["metadata"]["annotations"][INGRESS] == "internal"
    assert written["ping"]["spec"]["template"]["metadata"]["annotations"][VPC_EGRESS] == "all-traffic"
    for document in written.values():
        assert document["spec"]["template"]["spec"]["containers"][0]["image"] == PING


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("ping europe-west1-docker.pkg.dev/demo-project/mesh/ping:0a1b2c3\n", "image named by digest"),
        (f"ping {PING} extra\n", "one `<service> <image>` line per service"),
        (f"nosuch {PING}\n", "no Cloud Run manifest for nosuch"),
    ],
)
def test_images_must_be_pushed_digests_of_known_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(tmp_path / "out", "--vpc=none", images=images)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.yaml"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vpc=direct", "--subnet=mesh"], "--vpc direct needs --network and --subnet"),
        (["--vpc=direct", "--network=mesh", "--subnet=Mesh_1"], "subnet 'Mesh_1' is not a VPC subnet name"),
        (["--vpc=public", "--network=mesh", "--subnet=mesh"], "invalid choice: 'public'"),
    ],
)
def test_a_vpc_needs_a_network_and_subnet_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(tmp_path / "out", *args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
