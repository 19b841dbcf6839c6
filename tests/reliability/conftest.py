"""Shared fixtures: the development CA (made once per session), an identity emulator per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("reliability-certs"))


@pytest.fixture(scope="module")
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as running:
        yield running
