"""The development CA (once per session, its certificate covering every `*.run.app` name of the region) and
a front end per test, stopped when the test ends, pass or fail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloudrun import names
from cloudrun.frontend import FrontEnd
from emulators.dev_ca import DevCerts, ensure_dev_certs
from tests.cloudrun.instances import PROJECT_NUMBER, REGION


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("cloudrun-certs"), [names.wildcard(REGION)])


@pytest.fixture
def front(certs: DevCerts) -> Iterator[FrontEnd]:
    with FrontEnd(
        certs.server_cert, certs.server_key, project_number=PROJECT_NUMBER, region=REGION
    ) as started:
        yield started
