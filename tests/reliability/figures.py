"""Figures of a run (the numbers RELIABILITY.md quotes): logged, and appended as one JSON line to the file
RELIABILITY_FIGURES names, when it is set."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("reliability.figures")


def report(name: str, figures: dict[str, Any]) -> None:
    line = json.dumps({"figures": name, **figures})
    log.info("%s", line)
    print(line)
    if path := os.environ.get("RELIABILITY_FIGURES"):
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
