from __future__ import annotations

import pytest
from cloudbuild.substitutions import SubstitutionError, resolve

BUILT_IN = {"PROJECT_ID": "demo", "SHORT_SHA": "0a1b2c3"}


def apply(
    text: str, defaults: dict[str, str], overrides: dict[str, str] | None = None, **options: bool
) -> str:
    substitutions, user = resolve(
        BUILT_IN,
        defaults,
        overrides or {},
        loose=options.get("loose", False),
        dynamic=options.get("dynamic", False),
    )
    used: set[str] = set()
    result = substitutions.apply(text, used)
    substitutions.check_all_used(used, user)
    return result


def test_built_ins_defaults_and_overrides() -> None:
    assert apply("$PROJECT_ID/${_REPO}:$SHORT_SHA", {"_REPO": "mesh"}) == "demo/mesh:0a1b2c3"
    assert apply("${_REPO}", {"_REPO": "mesh"}, {"_REPO": "other"}) == "other"


def test_double_dollar_is_a_literal_dollar_for_bash() -> None:
    assert apply("$$svc $$(cat f) ${_A}", {"_A": "x"}) == "$svc $(cat f) x"


def test_used_but_undefined_is_refused_with_cloud_builds_words() -> None:
    with pytest.raises(
        SubstitutionError, match='key in the template "_MISSING" is not matched in the substitution data'
    ):
        apply("${_MISSING}", {})
    with pytest.raises(SubstitutionError, match='"HOME" is not a valid built-in substitution'):
        apply("$HOME", {})


def test_defined_but_unused_is_refused_including_overrides() -> None:
    with pytest.raises(
        SubstitutionError, match='key "_UNUSED" in the substitution data is not matched in the template'
    ):
        apply("${_A}", {"_A": "x", "_UNUSED": "y"})
    with pytest.raises(SubstitutionError, match='"_TYPO"'):
        apply("${_A}", {"_A": "x"}, {"_TYPO": "y"})


def test_allow_loose_empties_the_undefined_and_allows_the_unused() -> None:
    assert apply("[${_MISSING}]", {"_UNUSED": "y"}, loose=True) == "[]"


def test_built_ins_cannot_be_overridden_and_user_names_start_with_underscore() -> None:
    with pytest.raises(SubstitutionError, match="cannot be overridden"):
        apply("$PROJECT_ID", {}, {"PROJECT_ID": "other"})
    with pytest.raises(SubstitutionError, match="must begin with an underscore"):
        apply("x", {"lower": "y"})


def test_dynamic_substitutions_expand_values_that_name_others() -> None:
    defaults = {"_REGION": "eu", "_REGISTRY": "${_REGION}-docker.pkg.dev/$PROJECT_ID"}
    assert apply("${_REGISTRY}/ping", defaults, dynamic=True) == "eu-docker.pkg.dev/demo/ping"
    # Without the option a value is taken as it is written, and _REGION counts as unused.
    with pytest.raises(SubstitutionError, match='"_REGION"'):
        apply("${_REGISTRY}", defaults)
    with pytest.raises(SubstitutionError, match="refers to itself"):
        apply("${_A}", {"_A": "${_B}", "_B": "${_A}"}, dynamic=True)


def test_bash_expansions_are_refused_not_guessed() -> None:
    with pytest.raises(SubstitutionError, match="unsupported substitution"):
        apply("${SHORT_SHA:0:4}", {})
