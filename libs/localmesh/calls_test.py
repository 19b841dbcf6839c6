"""Quantiles read from a histogram's buckets, and the per-method table."""

from __future__ import annotations

from localmesh.calls import Histogram, Series, table

BOUNDS = (1.0, 2.0, 4.0)


def test_quantiles_interpolate_inside_the_bucket() -> None:
    histogram = Histogram(count=10, bounds=BOUNDS, buckets=(0, 10, 0, 0))  # all between 1 and 2 ms
    assert histogram.quantile(0.5) == 1.5
    assert histogram.quantile(0.99) == 1.99
    skewed = Histogram(count=100, bounds=BOUNDS, buckets=(90, 9, 0, 1))
    assert skewed.quantile(0.5) < 1.0 and 1.0 < skewed.quantile(0.95) <= 2.0
    assert skewed.quantile(1.0) == 4.0  # the overflow bucket: its lower bound


def test_the_table_has_a_line_per_method_with_errors_by_code() -> None:
    calls = {
        Series("routeguide", "/routeguide.RouteGuide/GetFeature", "OK"): Histogram(3, BOUNDS, (3, 0, 0, 0)),
        Series("routeguide", "/routeguide.RouteGuide/GetFeature", "INVALID_ARGUMENT"): Histogram(
            2, BOUNDS, (2, 0, 0, 0)
        ),
        Series("ping", "/ping.PingService/Send", "OK"): Histogram(1, BOUNDS, (0, 0, 1, 0)),
    }
    lines = table(calls)
    assert lines[0].split() == ["SERVICE", "METHOD", "CALLS", "ERRORS", "P50", "MS", "P99", "MS"]
    assert lines[1].split() == ["ping", "/ping.PingService/Send", "1", "-", "3.0", "4.0"]
    assert lines[2].split() == [
        "routeguide",
        "/routeguide.RouteGuide/GetFeature",
        "5",
        "INVALID_ARGUMENT",
        "2",
        "0.5",
        "1.0",
    ]
