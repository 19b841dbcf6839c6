"""What pip installs outside Pants' own lockfile (the ./pants bootstrap, the Cloud Build builder image) comes
from hashed locks, installed with --require-hashes: a file on the index that changes under a pinned version
(or a new transitive dependency) fails the install instead of running."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "build-support" / "bootstrap"
BUILDER = ROOT / "build-support" / "deploy" / "builder.Dockerfile"
LOCKS = [
    BOOTSTRAP / "pants-requirements.txt",
    BOOTSTRAP / "tools-requirements.txt",
    ROOT / "build-support" / "deploy" / "builder-requirements.txt",
]
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def requirements(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip requirements file; anything but pins with hashes is an error."""
    found: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())  # continuation lines joined
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split()
        pin = PIN.fullmatch(spec)
        assert pin, f"{path.name}: {spec!r} is not pinned with =="
        assert options and all(
            HASH.fullmatch(o) for o in options
        ), f"{path.name}: {spec} has no sha256 hashes"
        found[pin["name"].lower().replace("_", "-").replace(".", "-")] = (pin["version"], options)
    return found


def pins(path: Path) -> dict[str, str]:
    """The direct requirements of a .in file: name -> version."""
    found = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            pin = PIN.fullmatch(spec)
            assert pin, f"{path.name}: {spec!r} is not pinned with =="
            found[pin["name"].lower().replace("_", "-").replace(".", "-")] = pin["version"]
    return found


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_requirement_is_pinned_with_hashes_and_follows_its_input(lock: Path) -> None:
    locked = requirements(lock)
    wanted = pins(lock.with_suffix(".in"))
    assert wanted and {name: locked.get(name, ("missing",))[0] for name in wanted} == wanted


def test_the_bootstrap_installs_only_the_hashed_locks() -> None:
    script = re.sub(r"\\\n\s*", " ", (ROOT / "pants").read_text())
    installs = [line for line in script.splitlines() if re.search(r"\bpip\"? install\b", line)]
    assert len(installs) == 2
    for install, lock in zip(installs, ("pants-requirements.txt", "tools-requirements.txt")):
        assert "--require-hashes" in install and f'-r "$ROOT/build-support/bootstrap/{lock}"' in install
    # The version the bootstrap announces is the one its lock installs.
    announced = re.search(r'PANTS_VERSION="([^"]+)"', script)
    assert announced and requirements(LOCKS[0])["pantsbuild-pants"][0] == announced[1]


def test_the_builder_image_installs_only_its_hashed_lock() -> None:
    text = re.sub(r"\\\n\s*", " ", BUILDER.read_text())
    installs = re.findall(r"pip install [^&]*", text)
    assert len(installs) == 1
    assert "--require-hashes" in installs[0] and "-r /tmp/builder-requirements.txt" in installs[0]
    assert "COPY builder-requirements.txt /tmp/builder-requirements.txt" in text


def test_an_unhashed_requirement_is_found(tmp_path: Path) -> None:
    # Proves the parser above refuses what pip's --require-hashes would refuse.
    lock = tmp_path / "x.txt"
    lock.write_text("pyyaml==6.0.4 \\\n    --hash=sha256:" + "0" * 64 + "\nsix==1.17.0\n")
    with pytest.raises(AssertionError, match="six==1.17.0 has no sha256 hashes"):
        requirements(lock)


def test_buf_is_installed_from_npm_by_its_lockfile_with_integrity_hashes() -> None:
    # build-support/contracts: `npm ci` installs exactly what package-lock.json lists and checks each sha512.
    contracts = ROOT / "build-support" / "contracts"
    wanted = json.loads((contracts / "package.json").read_text())["devDependencies"]
    lock = json.loads((contracts / "package-lock.json").read_text())
    packages = {path: entry for path, entry in lock["packages"].items() if path}
    assert wanted == {"@bufbuild/buf": packages["node_modules/@bufbuild/buf"]["version"]}  # exact, no range
    assert packages and all(entry["integrity"].startswith("sha512-") for entry in packages.values())
    installer = (contracts / "check" / "buf.py").read_text()
    assert '[npm, "ci", "--ignore-scripts"' in installer and '"install"' not in installer
