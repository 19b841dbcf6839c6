"""A static spatial index: exact point lookup in O(1) and rectangle queries that skip what lies outside.

Points are sorted by latitude and cut into strips of about sqrt(n) points; each strip is sorted by
longitude. A rectangle query bisects to the strips that overlap its latitudes and, inside each, to the
points within its longitudes, so it touches O(strips + matches + two boundary strips), not every point.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Strip(Generic[T]):
    min_latitude: int
    max_latitude: int
    longitudes: list[int]  # sorted ascending
    latitudes: list[int]  # parallel to longitudes
    items: list[T]  # parallel to longitudes


class SpatialIndex(Generic[T]):
    """An immutable index of items at E7 points. Items at the same point: `at` gives the first given."""

    def __init__(self, entries: Iterable[tuple[int, int, T]], strip_size: int | None = None) -> None:
        by_latitude = sorted(entries, key=lambda entry: (entry[0], entry[1]))  # stable: keeps input order
        self._at: dict[tuple[int, int], T] = {}
        for latitude, longitude, item in by_latitude:
            self._at.setdefault((latitude, longitude), item)
        size = strip_size or max(16, math.isqrt(4 * len(by_latitude)))
        self._strips: list[_Strip[T]] = []
        for start in range(0, len(by_latitude), size):
            chunk = sorted(by_latitude[start : start + size], key=lambda entry: entry[1])
            self._strips.append(
                _Strip(
                    min_latitude=by_latitude[start][0],
                    max_latitude=by_latitude[min(start + size, len(by_latitude)) - 1][0],
                    longitudes=[entry[1] for entry in chunk],
                    latitudes=[entry[0] for entry in chunk],
                    items=[entry[2] for entry in chunk],
                )
            )
        # Non-decreasing, because strips are consecutive runs of the latitude order.
        self._strip_max_latitudes = [strip.max_latitude for strip in self._strips]
        self._count = len(by_latitude)

    def __len__(self) -> int:
        return self._count

    def at(self, latitude: int, longitude: int) -> T | None:
        return self._at.get((latitude, longitude))

    def within(self, lat_a: int, lon_a: int, lat_b: int, lon_b: int) -> Iterator[T]:
        """Items inside the rectangle with corners (lat_a, lon_a) and (lat_b, lon_b), in any corner order,
        edges included. Lazy, so a caller streaming the results holds no list of them."""
        lat_lo, lat_hi = min(lat_a, lat_b), max(lat_a, lat_b)
        lon_lo, lon_hi = min(lon_a, lon_b), max(lon_a, lon_b)
        for number in range(bisect_left(self._strip_max_latitudes, lat_lo), len(self._strips)):
            strip = self._strips[number]
            if strip.min_latitude > lat_hi:
                return
            first = bisect_left(strip.longitudes, lon_lo)
            end = bisect_right(strip.longitudes, lon_hi)
            if lat_lo <= strip.min_latitude and strip.max_latitude <= lat_hi:
                yield from strip.items[first:end]
            else:
                for position in range(first, end):
                    if lat_lo <= strip.latitudes[position] <= lat_hi:
                        yield strip.items[position]
