"""Coordinates in the E7 representation (degrees x 1e7) and great-circle distances between them."""

import math

E7 = 10_000_000
MAX_LATITUDE_E7 = 90 * E7
MAX_LONGITUDE_E7 = 180 * E7
# The mean earth radius the canonical RouteGuide examples use, so distances agree with theirs.
EARTH_RADIUS_M = 6_371_000.0


class InvalidCoordinate(ValueError):
    """A latitude or longitude outside its range; the message names the field and the value."""


def check_latitude(value: int, field: str) -> None:
    if not -MAX_LATITUDE_E7 <= value <= MAX_LATITUDE_E7:
        raise InvalidCoordinate(
            f"{field} {value} is out of range: must be within +-{MAX_LATITUDE_E7} (+-90 degrees x 1e7)"
        )


def check_longitude(value: int, field: str) -> None:
    if not -MAX_LONGITUDE_E7 <= value <= MAX_LONGITUDE_E7:
        raise InvalidCoordinate(
            f"{field} {value} is out of range: must be within +-{MAX_LONGITUDE_E7} (+-180 degrees x 1e7)"
        )


def check_point(latitude: int, longitude: int, where: str = "") -> None:
    """Raises InvalidCoordinate for the first bad coordinate; `where` prefixes the field names."""
    check_latitude(latitude, f"{where}latitude")
    check_longitude(longitude, f"{where}longitude")


def haversine_m(lat1: int, lon1: int, lat2: int, lon2: int) -> float:
    """Great-circle distance in metres between two E7 points."""
    phi1 = math.radians(lat1 / E7)
    phi2 = math.radians(lat2 / E7)
    dphi = phi2 - phi1
    dlambda = math.radians((lon2 - lon1) / E7)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.atan2(math.sqrt(a), math.sqrt(1 - a))
