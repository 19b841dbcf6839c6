"""Small, pure helpers of the harness: medians, percentiles, and the results table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction 0.5 = p50, 0.99 = p99)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return float(ordered[rank - 1])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (pastes straight into BENCHMARKS.md); numeric-looking columns right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    numeric = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [str(c).rjust(w) if n else str(c).ljust(w) for c, w, n in zip(cells, widths, numeric)]
        return "| " + " | ".join(out) + " |"

    rule = (
        "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace("%", "").replace("x", "").strip()
    if text in ("", "-"):
        return True
    try:
        float(text.split()[0])
    except ValueError:
        return False
    return True
