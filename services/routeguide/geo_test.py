import math

import pytest

from services.routeguide.geo import (
    MAX_LATITUDE_E7,
    MAX_LONGITUDE_E7,
    InvalidCoordinate,
    check_point,
    haversine_m,
)


def test_edges_of_the_range_are_valid() -> None:
    for latitude in (-MAX_LATITUDE_E7, 0, MAX_LATITUDE_E7):
        for longitude in (-MAX_LONGITUDE_E7, 0, MAX_LONGITUDE_E7):
            check_point(latitude, longitude)


@pytest.mark.parametrize(
    "latitude, longitude, field, value",
    [
        (900_000_001, 0, "latitude", 900_000_001),
        (-900_000_001, 0, "latitude", -900_000_001),
        (0, 1_800_000_001, "longitude", 1_800_000_001),
        (0, -2_147_483_648, "longitude", -2_147_483_648),
    ],
)
def test_out_of_range_names_field_and_value(latitude: int, longitude: int, field: str, value: int) -> None:
    with pytest.raises(InvalidCoordinate) as raised:
        check_point(latitude, longitude, "lo.")
    assert str(raised.value).startswith(f"lo.{field} {value} is out of range")


def _asin_haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    # The arcsine form, written independently of the module's atan2 form.
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371000 * math.asin(math.sqrt(h))


def test_distance_matches_known_values() -> None:
    assert haversine_m(0, 0, 0, 0) == 0.0
    # A quarter of the equator and pole to pole are exact fractions of the circumference.
    assert haversine_m(0, 0, 0, 900_000_000) == pytest.approx(math.pi * 6371000 / 2)
    assert haversine_m(-900_000_000, 0, 900_000_000, 0) == pytest.approx(math.pi * 6371000)
    # One degree of latitude is about 111.19 km on this sphere.
    assert haversine_m(400_000_000, -740_000_000, 410_000_000, -740_000_000) == pytest.approx(
        111_194.9, abs=0.1
    )


def test_distance_agrees_with_independent_formula() -> None:
    cases = [(409146138, -746188906, 407838351, -746143763), (-337000000, 1503000000, 515000000, -1000000)]
    for lat1, lon1, lat2, lon2 in cases:
        expected = _asin_haversine(lat1 / 1e7, lon1 / 1e7, lat2 / 1e7, lon2 / 1e7)
        assert haversine_m(lat1, lon1, lat2, lon2) == pytest.approx(expected, rel=1e-9)
        assert haversine_m(lat2, lon2, lat1, lon1) == pytest.approx(expected, rel=1e-9)
