import json
import os
from pathlib import Path
from typing import Any

import pytest

from services.routeguide.features import (
    BUILTIN_COUNT,
    FeatureDatabaseError,
    builtin_database,
    generate_features,
    load_database,
)

CANONICAL_DB = os.environ.get("ROUTEGUIDE_CANONICAL_DB", "/work/shared/data/route_guide_db.json")


def _write(tmp_path: Path, document: Any) -> str:
    path = tmp_path / "features.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return str(path)


def _entry(latitude: Any = 1, longitude: Any = 2, name: Any = "x") -> dict[str, Any]:
    return {"location": {"latitude": latitude, "longitude": longitude}, "name": name}


def test_loads_the_canonical_database() -> None:
    database = load_database(CANONICAL_DB)
    assert len(database) == 100
    assert database.source == CANONICAL_DB
    berkshire = [f for f in database.features if (f.latitude, f.longitude) == (409146138, -746188906)]
    assert [f.name for f in berkshire] == ["Berkshire Valley Management Area Trail, Jefferson, NJ, USA"]
    assert sum(1 for f in database.features if f.name == "") == 36  # canonical entries with no name


def test_missing_fields_default_as_in_proto3_json(tmp_path: Path) -> None:
    database = load_database(
        _write(tmp_path, [{"location": {"longitude": 5}}, {"location": {}, "name": "origin"}])
    )
    assert [(f.name, f.latitude, f.longitude) for f in database.features] == [("", 0, 5), ("origin", 0, 0)]


@pytest.mark.parametrize(
    "document, expected",
    [
        ("[{", "not valid JSON"),
        ({"location": {}}, "expected a JSON array of features, got dict"),
        ([_entry(), "oops"], "entry 1: feature must be a JSON object"),
        ([_entry(), {"name": "no place"}], "entry 1: missing location"),
        ([_entry(latitude=900_000_001)], "entry 0: location.latitude 900000001 is out of range"),
        (
            [_entry(), _entry(longitude=-1_800_000_001)],
            "entry 1: location.longitude -1800000001 is out of range",
        ),
        ([_entry(latitude=40.5)], "entry 0: location.latitude must be an integer"),
        ([_entry(longitude="2")], 'entry 0: location.longitude must be an integer (degrees x 1e7), got "2"'),
        ([_entry(latitude=True)], "entry 0: location.latitude must be an integer"),
        ([_entry(name=7)], "entry 0: name must be a string, got 7"),
        ([{"location": {"lat": 1, "longitude": 2}}], "entry 0: location has unknown key(s) ['lat']"),
        ([{**_entry(), "label": "x"}], "entry 0: feature has unknown key(s) ['label']"),
        ([_entry(), _entry(3, 4), _entry()], "entry 2: location (1, 2) repeats the location of entry 0"),
    ],
)
def test_a_bad_file_gives_one_error_naming_file_and_entry(
    tmp_path: Path, document: Any, expected: str
) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(FeatureDatabaseError) as raised:
        load_database(path)
    assert str(raised.value).startswith(f"feature database {path}: ")
    assert expected in str(raised.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.json")
    with pytest.raises(FeatureDatabaseError, match=f"feature database {path}: cannot read: No such file"):
        load_database(path)


def test_no_path_gives_the_builtin_dataset() -> None:
    for path in (None, ""):
        database = load_database(path)
        assert database.source.startswith("built-in")
        assert database == builtin_database()


def test_builtin_dataset_is_deterministic_named_and_valid(tmp_path: Path) -> None:
    database = builtin_database()
    assert len(database) == BUILTIN_COUNT
    assert all(f.name for f in database.features)
    assert len({(f.latitude, f.longitude) for f in database.features}) == BUILTIN_COUNT
    # Written out in the canonical format, it loads back unchanged (so it passes the same validation).
    document = [
        {"location": {"latitude": f.latitude, "longitude": f.longitude}, "name": f.name}
        for f in database.features
    ]
    assert load_database(_write(tmp_path, document)).features == database.features
    assert generate_features(50, seed=1) == generate_features(50, seed=1)
    assert generate_features(50, seed=1) != generate_features(50, seed=2)
