"""One engine and one image per service for the whole session (the BUILD file's batch tag runs every file of
tests/images in this one pytest process).

No engine and no means to start one: every test here skips with that one line, unless REQUIRE_IMAGE_TESTS=1
(.ci/run sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import base_image, daemon
from tests.images.containers import ServiceImage, build_image, engine_or_skip

# Service -> the gRPC service name its health reports.
SERVICES = {
    "ping": "ping.PingService",
    "routeguide": "routeguide.RouteGuide",
    "aggregator": "aggregator.v1.Aggregator",
}


# The first test's setup may install docker.io, build the base stand-in (minutes) and the three images.
SESSION_SETUP_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/images/" in str(item.path):
            item.add_marker(pytest.mark.timeout(SESSION_SETUP_TIMEOUT_S))


@pytest.fixture(scope="session")
def engine() -> Iterator[daemon.Engine]:
    found = engine_or_skip()
    # Whatever in this session runs `docker` (the container mesh's launcher) reaches the same engine.
    os.environ.update(found.env())
    try:
        base_image.ensure(found)
        yield found
    finally:
        if found.started:
            daemon.stop()


@pytest.fixture(scope="session")
def images(engine: daemon.Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServiceImage]:
    """Each service's image, built from the PEX that Pants packaged for this test (runtime_package_dependencies)
    with build-support/engine/build_image.sh, the command Cloud Build runs."""
    scratch = tmp_path_factory.mktemp("images")
    return {
        service: build_image(engine, service, name, Path(f"services.{service}/{service}.pex"), scratch)
        for service, name in SERVICES.items()
    }
