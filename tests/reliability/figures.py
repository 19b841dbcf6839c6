"""Figures of a run (what RELIABILITY.md reports), never asserted on: logged, and appended as one JSON line to the
file named by RELIABILITY_FIGURES when it is set."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("reliability.figures")


def record(name: str, figures: dict[str, Any]) -> None:
    line = json.dumps({"figures": name, **figures})
    log.info("%s", line)
    if path := os.environ.get("RELIABILITY_FIGURES"):
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
