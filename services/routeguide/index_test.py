import random

from services.routeguide.features import generate_features
from services.routeguide.index import SpatialIndex


def _brute_force(points: list[tuple[int, int, int]], a: tuple[int, int], b: tuple[int, int]) -> list[int]:
    lat_lo, lat_hi = sorted((a[0], b[0]))
    lon_lo, lon_hi = sorted((a[1], b[1]))
    return sorted(item for lat, lon, item in points if lat_lo <= lat <= lat_hi and lon_lo <= lon <= lon_hi)


def _hundred_thousand_points() -> list[tuple[int, int, int]]:
    rng = random.Random(7)
    clustered = [(f.latitude, f.longitude) for f in generate_features(60_000, seed=11)]
    anywhere = [
        (rng.randint(-900_000_000, 900_000_000), rng.randint(-1_800_000_000, 1_800_000_000))
        for _ in range(30_000)
    ]
    # Many points sharing a few latitudes and longitudes, so strips split runs of equal values.
    grid = [
        (rng.choice((0, 450_000_000, -450_000_000)), rng.randint(-1000, 1000) * 1000) for _ in range(10_000)
    ]
    return [(lat, lon, item) for item, (lat, lon) in enumerate(clustered + anywhere + grid)]


def test_rectangles_match_brute_force_on_100k_points() -> None:
    points = _hundred_thousand_points()
    assert len(points) == 100_000
    index = SpatialIndex(points)
    assert len(index) == 100_000
    rng = random.Random(3)
    non_empty = 0
    for _ in range(150):
        if rng.random() < 0.5:
            # Corners on existing points, so the inclusive edges are exercised.
            a = points[rng.randrange(len(points))][:2]
            b = points[rng.randrange(len(points))][:2]
            a, b = (a[0], a[1]), (b[0], b[1])
        else:
            centre = points[rng.randrange(len(points))]
            half_lat, half_lon = rng.randint(0, 20_000_000), rng.randint(0, 40_000_000)
            a = (centre[0] - half_lat, centre[1] + half_lon)
            b = (centre[0] + half_lat, centre[1] - half_lon)
        expected = _brute_force(points, a, b)
        assert sorted(index.within(a[0], a[1], b[0], b[1])) == expected
        assert sorted(index.within(b[0], b[1], a[0], a[1])) == expected
        non_empty += bool(expected)
    assert non_empty > 50  # the rectangles did find things, so the equality above means something
    # Narrow in longitude but spanning every latitude: every strip is visited, none scanned whole.
    assert sorted(index.within(-900_000_000, 0, 900_000_000, 5_000_000)) == _brute_force(
        points, (-900_000_000, 0), (900_000_000, 5_000_000)
    )
    everything = (-900_000_000, -1_800_000_000), (900_000_000, 1_800_000_000)
    assert sorted(index.within(*everything[0], *everything[1])) == list(range(100_000))


def test_exact_point_lookup() -> None:
    points = _hundred_thousand_points()
    index = SpatialIndex(points)
    first_at: dict[tuple[int, int], int] = {}
    for lat, lon, item in points:
        first_at.setdefault((lat, lon), item)
    rng = random.Random(5)
    for lat, lon, _ in rng.sample(points, 1000):
        assert index.at(lat, lon) == first_at[(lat, lon)]
    assert index.at(1, 1) is None


def test_same_point_keeps_first_for_lookup_and_all_for_rectangles() -> None:
    index = SpatialIndex([(5, 5, "first"), (5, 5, "second"), (1, 1, "other")], strip_size=1)
    assert index.at(5, 5) == "first"
    assert sorted(index.within(0, 0, 10, 10)) == ["first", "other", "second"]
    assert list(index.within(5, 5, 5, 5)) == ["first", "second"]
    assert list(index.within(2, 2, 4, 4)) == []


def test_empty_index() -> None:
    index: SpatialIndex[str] = SpatialIndex([])
    assert len(index) == 0
    assert index.at(0, 0) is None
    assert list(index.within(-10, -10, 10, 10)) == []
