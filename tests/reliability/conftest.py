"""Shared fixtures: the development CA (made once per session)."""

from __future__ import annotations

import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("reliability-certs"))
