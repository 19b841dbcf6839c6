"""The repository is the whole product: nothing in it reads beside the clone, names one machine's paths, or
leaves its text files unscanned. A fresh clone from the repository's host has nothing beside it."""

from __future__ import annotations

import re
from pathlib import Path

# Spelled with a character class so that this file does not match itself.
_OUTSIDE = re.compile(
    r"(?P<beside>\.\./+share[d]\b)"  # the folder that sits beside one checkout, on one machine
    r"|(?P<machine>(?<![\w.-])/(?:wor[k]|roo[t]|hom[e]|User[s])/)"  # a machine's home or work folder
)


def _repository_files() -> list[Path]:
    """What Pants gives this test (the root BUILD's `repository` target), without the PEXes and shims that it
    puts beside them (pytest_runner.pex, pytest_runner.pex_pex_shim.sh, ...: they name this machine's paths).
    """
    return sorted(
        path
        for path in Path.cwd().rglob("*")
        if path.is_file()
        and not any(".pex" in part or part == "__pycache__" for part in path.relative_to(Path.cwd()).parts)
    )


def test_the_scan_covers_the_build_the_ci_the_services_and_the_tests() -> None:
    names = {str(path.relative_to(Path.cwd())) for path in _repository_files()}
    for expected in (
        "pants",
        "pants.toml",
        "BUILD",
        ".ci/run",
        "cloudbuild.yaml",
        "README.md",
        "services/routeguide/features_test.py",
        "services/routeguide/route_guide_db.json",
        "libs/mesh/serving.py",
        "build-support/macros/cloud_run.py",
        "tests/repo/self_contained_test.py",
    ):
        assert expected in names


def test_nothing_reads_outside_the_repository_or_names_a_machine_path() -> None:
    found = []
    for path in _repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if _OUTSIDE.search(line):
                found.append(f"{path.relative_to(Path.cwd())}:{number}: {line.strip()[:120]}")
    assert found == []


def test_the_pattern_catches_what_it_guards_against() -> None:
    share = "share" + "d"
    for line in (
        f'extra_env_vars = ["DB=%(buildroot)s/../{share}/data/db.json"]',
        f'os.environ.get("DB", "/{"work"}/{share}/data/db.json")',
        f"PATH=/{'root'}/.pyenv/bin:$PATH",
    ):
        assert _OUTSIDE.search(line), line
    for line in ("COPY services.ping/ping.pex /tmp/ping.pex", "tee /workspace/affected.txt", "../libs/mesh"):
        assert not _OUTSIDE.search(line), line
