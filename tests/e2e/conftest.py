"""One real mesh per test module (starting it takes seconds), and a traced client holding the developer's token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from localmesh.demo import DemoClient
from localmesh.launcher import Mesh

log = logging.getLogger("tests.e2e.mesh")


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the modules' meshes: the development CA is made once.
    return tmp_path_factory.mktemp("mesh-state")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(state_dir: Path) -> AsyncIterator[Mesh]:
    # The instances' output goes to logging, so a failing test shows what the processes said.
    async with Mesh(state_dir, echo=log.info) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(mesh: Mesh) -> AsyncIterator[DemoClient]:
    caller = DemoClient(mesh)
    yield caller
    await caller.close()
