from __future__ import annotations

import pytest

from tests.bench.stats import median, percentile, table


def test_median_and_percentiles() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        median([])


def test_table_is_markdown_with_numbers_right_aligned() -> None:
    text = table(["config", "QPS"], [["raw", "5,600"], ["full", "4,900"]])
    lines = text.splitlines()
    assert lines[0].startswith("| config") and lines[1].endswith(":|")
    assert lines[2] == "| raw    | 5,600 |"
