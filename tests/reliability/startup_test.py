"""Start-up on Cloud Run (K_SERVICE set): a service whose callers nothing would check refuses to start, with one
line naming the missing variable, unless AUTH_IAM_ONLY=true says that Cloud Run's IAM alone guards it."""

from __future__ import annotations

import pytest

from localmesh.supervisor import StartError
from tests.reliability.identity_attacks_test import AUDIENCE
from tests.reliability.processes import Service

CLOUD_RUN = {"K_SERVICE": "routeguide"}


async def refused(env: dict[str, str]) -> str:
    """The one config error line of a service that must not start."""
    service = Service("routeguide", env)
    with pytest.raises(StartError):
        await service.start(timeout=20)
    assert service.returncode == 2
    errors = [line for line in service.lines if line.startswith("config error:")]
    assert len(errors) == 1, service.lines
    return errors[0]


async def test_no_audience_on_cloud_run_stops_start_up() -> None:
    line = await refused(CLOUD_RUN)
    assert (
        line.startswith("config error: AUTH_AUDIENCE is not set on Cloud Run")
        and "AUTH_IAM_ONLY=true" in line
    )


async def test_no_allow_list_on_cloud_run_stops_start_up() -> None:
    line = await refused({**CLOUD_RUN, "AUTH_AUDIENCE": AUDIENCE})
    assert line.startswith("config error: AUTH_ALLOWED_CALLERS is not set on Cloud Run"), line


async def test_iam_alone_is_an_explicit_opt_out() -> None:
    service = await Service("routeguide", {**CLOUD_RUN, "AUTH_IAM_ONLY": "true"}).start()
    try:
        assert any("AUTH_IAM_ONLY" in message for message in service.messages() if "serving" in message)
    finally:
        assert await service.stop() == 0
