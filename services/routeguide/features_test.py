import json
from pathlib import Path
from typing import Any

import pytest

from services.routeguide.features import (
    BUILTIN_SOURCE,
    GENERATED_COUNT,
    FeatureDatabaseError,
    builtin_database,
    generate_features,
    generated_database,
    load_database,
    write_database,
)


def _write(tmp_path: Path, document: Any) -> str:
    path = tmp_path / "features.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return str(path)


def _entry(latitude: Any = 1, longitude: Any = 2, name: Any = "x") -> dict[str, Any]:
    return {"location": {"latitude": latitude, "longitude": longitude}, "name": name}


def test_the_builtin_database_is_the_canonical_routeguide_set() -> None:
    database = builtin_database()
    assert len(database) == 100
    assert database.source == BUILTIN_SOURCE
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


def test_a_file_that_is_not_utf8_is_not_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"name": "Caf\xe9"}]')
    with pytest.raises(FeatureDatabaseError, match=f"feature database {path}: not valid JSON"):
        load_database(str(path))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.json")
    with pytest.raises(FeatureDatabaseError, match=f"feature database {path}: cannot read: No such file"):
        load_database(path)


def test_no_path_gives_the_builtin_canonical_set() -> None:
    for path in (None, ""):
        assert load_database(path) == builtin_database()


def test_the_builtin_set_written_out_loads_back_unchanged(tmp_path: Path) -> None:
    path = str(tmp_path / "canonical.json")
    write_database(builtin_database(), path)
    assert load_database(path).features == builtin_database().features


def test_generated_dataset_is_deterministic_named_and_valid(tmp_path: Path) -> None:
    database = generated_database()
    assert len(database) == GENERATED_COUNT
    assert all(f.name for f in database.features)
    assert len({(f.latitude, f.longitude) for f in database.features}) == GENERATED_COUNT
    # Written out in the canonical format, it loads back unchanged (so it passes the same validation).
    path = str(tmp_path / "generated.json")
    write_database(database, path)
    assert load_database(path).features == database.features
    assert generate_features(50, seed=1) == generate_features(50, seed=1)
    assert generate_features(50, seed=1) != generate_features(50, seed=2)
