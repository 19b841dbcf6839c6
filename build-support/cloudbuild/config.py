"""A cloudbuild.yaml read into steps with every substitution applied, or the error Cloud Build would give."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from cloudbuild.substitutions import ALLOW_LOOSE, SubstitutionError, resolve

DEFAULT_STEP_TIMEOUT_S = 600.0  # Cloud Build's default build timeout bounds a step with none of its own
DEFAULT_BUILD_TIMEOUT_S = 600.0
START = "-"  # waitFor: ["-"]: start when the build starts


class ConfigError(ValueError):
    """The config is not a build Cloud Build would start."""


@dataclass(frozen=True)
class Step:
    index: int
    id: str  # its `id`, else its index (Cloud Build names such a step by number)
    name: str  # the builder image
    entrypoint: str | None
    args: tuple[str, ...]
    env: tuple[str, ...]
    dir: str
    timeout_s: float | None
    wait_for: tuple[str, ...] | None  # None: every earlier step

    @property
    def label(self) -> str:
        return f'step #{self.index} "{self.id}"'


@dataclass(frozen=True)
class Build:
    steps: tuple[Step, ...]
    timeout_s: float
    substitutions: Mapping[str, str] = field(default_factory=dict)

    def dependencies(self, step: Step) -> tuple[Step, ...]:
        if step.wait_for is None:
            return self.steps[: step.index]
        if step.wait_for == (START,):
            return ()
        by_id = {s.id: s for s in self.steps}
        return tuple(by_id[i] for i in step.wait_for)


def duration(value: Any, where: str) -> float:
    """Cloud Build's durations: "600s" (or "1.5s")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(value))
    if not match:
        raise ConfigError(f'{where}: invalid duration "{value}" (write seconds, for example "600s")')
    return float(match[1])


def load(text: str, built_in: Mapping[str, str], overrides: Mapping[str, str]) -> Build:
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("steps"), list) or not document["steps"]:
        raise ConfigError("invalid build: a build config needs a non-empty list of steps")
    options = document.get("options") or {}
    defaults = {str(k): str(v) for k, v in (document.get("substitutions") or {}).items()}
    substitutions, user = resolve(
        built_in,
        defaults,
        overrides,
        loose=options.get("substitutionOption") == ALLOW_LOOSE,
        dynamic=bool(options.get("dynamicSubstitutions")),
    )
    used: set[str] = set()

    def sub(value: Any) -> str:
        return substitutions.apply(str(value), used)

    steps = []
    ids: set[str] = set()
    for index, raw in enumerate(document["steps"]):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"invalid build: step {index} has no name")
        step_id = str(raw.get("id", index))
        wait_for = raw.get("waitFor")
        if wait_for is not None:
            unknown = [w for w in wait_for if w != START and w not in ids]
            if unknown:
                # Cloud Build: a step may only wait for steps defined before it.
                raise ConfigError(
                    f'invalid build: step {index} ("{step_id}") waits for unknown step "{unknown[0]}"'
                )
        if step_id in ids:
            raise ConfigError(f'invalid build: duplicate step id "{step_id}"')
        ids.add(step_id)
        steps.append(
            Step(
                index=index,
                id=step_id,
                name=sub(raw["name"]),
                entrypoint=sub(raw["entrypoint"]) if "entrypoint" in raw else None,
                args=tuple(sub(a) for a in raw.get("args", [])),
                env=tuple(sub(e) for e in raw.get("env", [])),
                dir=sub(raw.get("dir", "")),
                timeout_s=duration(raw["timeout"], f"step {step_id}") if "timeout" in raw else None,
                wait_for=tuple(wait_for) if wait_for is not None else None,
            )
        )
    for key in ("images", "tags"):
        for value in document.get(key) or []:
            sub(value)
    substitutions.check_all_used(used, user)
    timeout = duration(document["timeout"], "timeout") if "timeout" in document else DEFAULT_BUILD_TIMEOUT_S
    return Build(tuple(steps), timeout, dict(substitutions.values))


def parse_pairs(specs: Sequence[str]) -> dict[str, str]:
    """--substitutions=_A=1,_B=2 (repeatable), as gcloud takes them: `^;^_S=a,b;_T=c` splits on `;` instead."""
    pairs = {}
    for spec in specs:
        delimiter = ","
        if escaped := re.match(r"\^(.)\^", spec):
            delimiter, spec = escaped[1], spec[escaped.end() :]
        for item in filter(None, spec.split(delimiter)):
            key, equals, value = item.partition("=")
            if not equals:
                raise SubstitutionError(f"--substitutions: {item!r} is not KEY=VALUE")
            pairs[key.strip()] = value
    return pairs
