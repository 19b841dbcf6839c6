"""Cloud Build's substitutions, applied as Cloud Build applies them to a build config.

`$NAME` and `${NAME}` name a substitution: a built-in (PROJECT_ID, SHORT_SHA, ...) or the config's own, whose
names start with `_`; `$$` is a literal `$`. A name used but not defined, or defined and never used, fails the
build before any step runs, unless `options.substitutionOption` is ALLOW_LOOSE (then an undefined one is
empty). With `options.dynamicSubstitutions: true` a substitution's value may itself name others (as in bash);
Cloud Build's further bash expansions (`${X:0:7}`, `${X/a/b}`) are refused here with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# What Cloud Build defines for every build (some empty outside a trigger).
BUILT_IN = (
    "PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "TRIGGER_NAME", "TRIGGER_BUILD_CONFIG_PATH",
    "COMMIT_SHA", "REVISION_ID", "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME",
    "REF_NAME", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
)  # fmt: skip
USER_NAME = re.compile(r"_[A-Z0-9_]+")
# `$$`, `${...}` or `$NAME`; anything else after `$` is left as it is (as Cloud Build does).
TOKEN = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
ALLOW_LOOSE = "ALLOW_LOOSE"


class SubstitutionError(ValueError):
    """An invalid build: the message is Cloud Build's wording for the same mistake."""


@dataclass(frozen=True)
class Substitutions:
    values: Mapping[str, str]
    loose: bool = False  # options.substitutionOption: ALLOW_LOOSE
    # Names that other substitutions' values referenced (dynamicSubstitutions): they count as used.
    referenced: frozenset[str] = frozenset()

    def apply(self, text: str, used: set[str]) -> str:
        """text with every substitution filled in; the names it referenced are added to used."""

        def replace(match: re.Match[str]) -> str:
            if match["dollar"]:
                return "$"
            name = match["braced"] if match["braced"] is not None else match["bare"]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise SubstitutionError(
                    f'invalid build: unsupported substitution "${{{name}}}" (this runner expands plain names only)'
                )
            used.add(name)
            if name in self.values:
                return self.values[name]
            if self.loose:
                return ""
            if USER_NAME.fullmatch(name):
                raise SubstitutionError(
                    f'invalid build: key in the template "{name}" is not matched in the substitution data;'
                    f" substitutions = {_show(self.values)}"
                )
            raise SubstitutionError(
                f'invalid build: key in the template "{name}" is not a valid built-in substitution'
            )

        return TOKEN.sub(replace, text)

    def check_all_used(self, used: set[str], defined: set[str]) -> None:
        """Cloud Build refuses a user substitution (the config's or --substitutions') that nothing uses."""
        if self.loose:
            return
        unused = sorted(n for n in defined if n not in used and n not in self.referenced)
        if unused:
            raise SubstitutionError(
                f'invalid build: key "{unused[0]}" in the substitution data is not matched in the template'
            )


def _show(values: Mapping[str, str]) -> str:
    return "map[" + " ".join(f"{k}:{v}" for k, v in sorted(values.items()) if k.startswith("_")) + "]"


def resolve(
    built_in: Mapping[str, str],
    defaults: Mapping[str, str],
    overrides: Mapping[str, str],
    *,
    loose: bool,
    dynamic: bool,
) -> tuple[Substitutions, set[str]]:
    """The build's substitutions: built-ins, the config's `_NAME` defaults, then --substitutions over them.

    Returns them with the user-defined names (which must all be used). Overriding a built-in is refused, as
    Cloud Build refuses it; a user name must be `_` and capitals/digits.
    """
    for name in [*defaults, *overrides]:
        if name in BUILT_IN and name in overrides:
            raise SubstitutionError(f'invalid build: built-in substitution "{name}" cannot be overridden')
        if not USER_NAME.fullmatch(name):
            raise SubstitutionError(
                f'invalid build: substitution key "{name}" must begin with an underscore and use only'
                " uppercase letters, numbers and underscores"
            )
    user = {**defaults, **overrides}
    if not dynamic:
        return Substitutions({**built_in, **user}, loose), set(user)
    # User values may name built-ins and each other (bash style); `$$` stays a literal `$`.
    expanded: dict[str, str] = {}
    referenced: set[str] = set()

    def expand(name: str, stack: tuple[str, ...]) -> str:
        if name in stack:
            raise SubstitutionError(
                f"invalid build: substitution {name} refers to itself through {' -> '.join(stack)}"
            )
        if name not in expanded:
            inner = Substitutions(
                {**built_in, **{n: expand(n, (*stack, name)) for n in _names(user[name]) if n in user}}, loose
            )
            expanded[name] = inner.apply(user[name], referenced)
        return expanded[name]

    for name in user:
        expand(name, ())
    return Substitutions({**built_in, **expanded}, loose, frozenset(referenced)), set(user)


def _names(text: str) -> set[str]:
    return {
        m["braced"] if m["braced"] is not None else m["bare"] for m in TOKEN.finditer(text) if not m["dollar"]
    }
