"""The feature database: the canonical JSON format, validated on load. Built in: gRPC's canonical RouteGuide
features (route_guide_db.json, packaged as a resource). A generated dataset of any size, for tests and
benchmarks that need more features than the canonical 100, is chosen explicitly with generated_database()."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

from services.routeguide.geo import E7, InvalidCoordinate, check_point

BUILTIN_RESOURCE = "route_guide_db.json"  # beside this module; a resource of the PEX and the image
BUILTIN_SOURCE = "built-in (gRPC's canonical RouteGuide features)"
GENERATED_SEED = 20240607
GENERATED_COUNT = 500

# Named regions (approximate centres in degrees) the built-in features are scattered around.
_REGIONS = (
    ("Jersey Highlands", 41.0, -74.5),
    ("Cascade Foothills", 47.6, -121.4),
    ("Lake District", 54.5, -3.1),
    ("Black Forest", 48.2, 8.2),
    ("Hokkaido Uplands", 43.1, 142.8),
    ("Blue Mountains", -33.7, 150.3),
    ("Drakensberg", -29.3, 29.4),
    ("Patagonian Andes", -50.3, -72.3),
)
_ADJECTIVES = tuple(
    "Old North South Cedar Maple Granite Silver Eagle Hidden Quiet Lone Red Blue Green High Long Stony Pine".split()
)
_NOUNS = tuple(
    "Creek Ridge Hollow Falls Meadow Brook Hill Lake Point Bluff Glen Harbor Rock Spring Field".split()
)
_KINDS = tuple(
    "Trail Park Overlook Bridge Lighthouse Campground Reservoir Preserve Tower Mill Station Garden".split()
)
_SPREAD_E7 = int(0.75 * E7)


class FeatureDatabaseError(ValueError):
    """A feature file that cannot be read or does not hold valid features; the message names the file."""


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    latitude: int
    longitude: int


@dataclass(frozen=True, slots=True)
class FeatureDatabase:
    features: tuple[Feature, ...]
    source: str  # where the features came from, for start-up logs

    def __len__(self) -> int:
        return len(self.features)


def load_database(path: str | None) -> FeatureDatabase:
    """The features in the JSON file at `path`, or the built-in canonical ones when `path` is None or empty."""
    if not path:
        return builtin_database()
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise FeatureDatabaseError(
            f"feature database {path}: cannot read: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError as error:
        raise FeatureDatabaseError(f"feature database {path}: not valid JSON: {error}") from None
    return _decode(text, path)


def builtin_database() -> FeatureDatabase:
    """gRPC's canonical RouteGuide features, read from the package (so from the PEX and the image too)."""
    text = resources.files("services.routeguide").joinpath(BUILTIN_RESOURCE).read_text(encoding="utf-8")
    return _decode(text, BUILTIN_SOURCE)


def _decode(text: str, source: str) -> FeatureDatabase:
    try:
        features = parse_features(json.loads(text))
    except json.JSONDecodeError as error:
        raise FeatureDatabaseError(f"feature database {source}: not valid JSON: {error}") from None
    except ValueError as error:
        raise FeatureDatabaseError(f"feature database {source}: {error}") from None
    return FeatureDatabase(features=features, source=source)


def parse_features(document: Any) -> tuple[Feature, ...]:
    """Validates a decoded canonical feature list; raises ValueError naming the first bad entry."""
    if not isinstance(document, list):
        raise ValueError(f"expected a JSON array of features, got {type(document).__name__}")
    features: list[Feature] = []
    first_entry_at: dict[tuple[int, int], int] = {}
    for index, entry in enumerate(document):
        try:
            feature = _parse_entry(entry)
        except ValueError as error:
            raise ValueError(f"entry {index}: {error}") from None
        key = (feature.latitude, feature.longitude)
        if key in first_entry_at:
            # GetFeature answers with one feature per point, so a second one there would be unreachable.
            raise ValueError(
                f"entry {index}: location {key} repeats the location of entry {first_entry_at[key]}"
            )
        first_entry_at[key] = index
        features.append(feature)
    return tuple(features)


def _parse_entry(entry: Any) -> Feature:
    # Missing fields default as in proto3 JSON (a feature at latitude 0 omits it); unknown keys are typos.
    _check_object(entry, "feature", {"location", "name"})
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {json.dumps(name)}")
    if "location" not in entry:
        raise ValueError("missing location")
    location = entry["location"]
    _check_object(location, "location", {"latitude", "longitude"})
    latitude = _int_field(location, "latitude")
    longitude = _int_field(location, "longitude")
    try:
        check_point(latitude, longitude, "location.")
    except InvalidCoordinate as error:
        raise ValueError(str(error)) from None
    return Feature(name=name, latitude=latitude, longitude=longitude)


def _check_object(value: Any, what: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {json.dumps(value)[:80]}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; expected {sorted(allowed)}")


def _int_field(location: dict[str, Any], field: str) -> int:
    value = location.get(field, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"location.{field} must be an integer (degrees x 1e7), got {json.dumps(value)}")
    return value


def write_database(database: FeatureDatabase, path: str) -> None:
    """Writes `database` in the canonical JSON format (what ROUTEGUIDE_DB reads)."""
    document = [
        {"location": {"latitude": f.latitude, "longitude": f.longitude}, "name": f.name}
        for f in database.features
    ]
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file)


def generated_database(count: int = GENERATED_COUNT, seed: int = GENERATED_SEED) -> FeatureDatabase:
    """A deterministic generated dataset, for tests and benchmarks that need size (never served by default)."""
    features = generate_features(count, seed)
    return FeatureDatabase(features=features, source=f"generated ({count} features, seed {seed})")


def generate_features(count: int, seed: int) -> tuple[Feature, ...]:
    """`count` named features at distinct points around a few regions; the same for the same seed."""
    rng = random.Random(seed)
    taken: set[tuple[int, int]] = set()
    features: list[Feature] = []
    while len(features) < count:
        region, centre_lat, centre_lon = rng.choice(_REGIONS)
        latitude = int(centre_lat * E7) + rng.randint(-_SPREAD_E7, _SPREAD_E7)
        longitude = int(centre_lon * E7) + rng.randint(-_SPREAD_E7, _SPREAD_E7)
        if (latitude, longitude) in taken:
            continue  # vanishingly rare; the loop still ends since the regions hold ~10^14 points each
        taken.add((latitude, longitude))
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_KINDS)}, {region}"
        features.append(Feature(name=name, latitude=latitude, longitude=longitude))
    return tuple(features)
