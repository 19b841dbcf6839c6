"""build-support/deploy/render.py: placeholders filled in, and nothing unexpected reaches a manifest."""

from __future__ import annotations

import pytest

from deploy.render import render

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
