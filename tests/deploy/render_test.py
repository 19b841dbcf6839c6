"""build-support/deploy/render.py: placeholders filled in, and nothing unexpected reaches a manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.reach import INGRESS, VPC_EGRESS
from deploy.render import main, render
from tests.deploy.repo import ROOT

VALUES = {
    "PROJECT_ID": "demo-project",
    "PROJECT_NUMBER": "123456789012",
    "REGION": "europe-west1",
    "IMAGE": "europe-west1-docker.pkg.dev/demo-project/mesh/ping:0a1b2c3",
}


def test_fills_in_every_placeholder() -> None:
    text = "image: ${IMAGE}\nurl: https://ping-${PROJECT_NUMBER}.${REGION}.run.app\nsa: x@${PROJECT_ID}.iam\n"
    assert render(text, VALUES) == (
        "image: europe-west1-docker.pkg.dev/demo-project/mesh/ping:0a1b2c3\n"
        "url: https://ping-123456789012.europe-west1.run.app\nsa: x@demo-project.iam\n"
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


def run(out: Path, *args: str) -> int:
    return main(
        [
            "--project-id=demo-project",
            "--project-number=123456789012",
            "--region=europe-west1",
            "--registry=europe-west1-docker.pkg.dev/demo-project/mesh",
            "--tag=0a1b2c3",
            f"--root={ROOT}",
            f"--out={out}",
            *args,
        ]
    )


def test_writes_each_cloud_run_service_of_a_folder_with_its_reach(tmp_path: Path) -> None:
    assert run(tmp_path, "--vpc=direct", "--network=mesh", "--subnet=mesh", "ping") == 0
    written = {p.stem: yaml.safe_load(p.read_text()) for p in tmp_path.iterdir()}
    assert set(written) == {"ping", "ping-upstream"}
    assert written["ping-upstream"]["metadata"]["annotations"][INGRESS] == "internal"
    assert written["ping"]["spec"]["template"]["metadata"]["annotations"][VPC_EGRESS] == "all-traffic"


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
        run(tmp_path / "out", *args, "ping")
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
