"""The services' base image, python:3.11-slim-bookworm: pulled where a registry serves it, else a stand-in
built from Debian's own packages (Debian's python3.11 on a minimal bookworm, security updates applied, slimmed
the way debian:bookworm-slim is).

The stand-in is built once per engine and rebuilt only when its recipe changes (the constants and the build
steps below, not this module's other code): the recipe's hash is the image's RECIPE_LABEL. An image of that name without the label (a pulled official one) is left alone.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine import debian
from engine.daemon import Engine, state_dir

TAG = "python:3.11-slim-bookworm"
SUITE = "bookworm"
RECIPE_LABEL = "org.grpc-mesh.base-recipe"
# debootstrap does not resolve virtual packages: python3.11-venv's python3-distutils and python3-lib2to3
# must be named.
PACKAGES = [
    "python3.11",
    "python3.11-venv",
    "python3-distutils",
    "python3-lib2to3",
    "python3",
    "ca-certificates",
    "netbase",
    "tzdata",
]
# The official image's configuration (`docker import` sets none of its own).
CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]
# What debian:bookworm-slim leaves out, also for packages installed later (dpkg path excludes).
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""
APT_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")
ONE_LINE = re.compile(r"^\s*deb\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)")


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    signed_by: str | None


def recipe_hash() -> str:
    steps = [inspect.getsource(step) for step in (build, _configure, _upgrade, _slim)]
    recipe = repr([SUITE, PACKAGES, CHANGES, SLIM_DPKG_CFG, *steps])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def configured_sources(roots: tuple[str, ...] = APT_SOURCES) -> list[AptSource]:
    """The Debian `deb` sources this machine's apt uses: one-line (*.list) and deb822 (*.sources) files."""
    files: list[Path] = []
    for root in map(Path, roots):
        files += sorted(root.glob("*.list")) + sorted(root.glob("*.sources")) if root.is_dir() else [root]
    sources: list[AptSource] = []
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        sources += _deb822(text) if path.suffix == ".sources" else _one_line(text)
    return sources


def _one_line(text: str) -> list[AptSource]:
    found = []
    for line in text.splitlines():
        match = ONE_LINE.match(line)
        if match:
            options = dict(o.split("=", 1) for o in (match["options"] or "").split() if "=" in o)
            found.append(AptSource(match["uri"].rstrip("/"), (match["suite"],), options.get("signed-by")))
    return found


def _deb822(text: str) -> list[AptSource]:
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            found.append(
                AptSource(uri.rstrip("/"), tuple(fields.get("suites", "").split()), fields.get("signed-by"))
            )
    return found


def mirrors(sources: list[AptSource]) -> tuple[AptSource, AptSource | None]:
    """The mirror that serves the bookworm suite, and the one that serves bookworm-security (if any)."""
    main = next((s for s in sources if SUITE in s.suites), None)
    if main is None:
        raise RuntimeError(
            f"no apt source of this machine serves Debian '{SUITE}' (looked in {', '.join(APT_SOURCES)}); "
            f"add one, or make {TAG} pullable"
        )
    security = next((s for s in sources if f"{SUITE}-security" in s.suites), None)
    return main, security


def current_recipe(engine: Engine) -> str | None:
    """The stand-in's recipe label; '' for an image without one (pulled); None when there is no image."""
    inspected = engine.docker(
        "image", "inspect", "--format", f'{{{{ index .Config.Labels "{RECIPE_LABEL}" }}}}', TAG, check=False
    )
    if inspected.returncode != 0:
        return None
    label = inspected.stdout.strip()
    return "" if label in ("", "<no value>") else label


def ensure(engine: Engine, *, force: bool = False) -> str:
    """Make TAG exist on engine; says what it did."""
    recipe = current_recipe(engine)
    if not force:
        if recipe == "":
            return "present (not a stand-in: left alone)"
        if recipe == recipe_hash():
            return f"stand-in up to date (recipe {recipe})"
        if recipe is None and engine.docker("pull", "--quiet", TAG, check=False, timeout=120).returncode == 0:
            return "pulled"
    began = time.monotonic()
    build(engine)
    return f"stand-in built from Debian packages in {time.monotonic() - began:.0f} s (recipe {recipe_hash()})"


def build(engine: Engine) -> None:
    why_not = debian.can_install()
    if why_not:
        raise RuntimeError(f"cannot build the {TAG} stand-in: {why_not} (debootstrap needs root on Debian)")
    if not shutil.which("debootstrap", path=debian.SYSTEM_PATH):
        debian.install(["debootstrap"])
    main, security = mirrors(configured_sources())
    work = state_dir() / "base-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rootfs = work / "rootfs"
    try:
        keyring = ["--keyring=" + main.signed_by] if main.signed_by and main.signed_by.startswith("/") else []
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                *keyring,
                SUITE,
                str(rootfs),
                main.uri,
            ],
            "debootstrap",
        )
        _configure(rootfs, main, security)
        _upgrade(rootfs)
        _slim(rootfs)
        tarball = work / "rootfs.tar"
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tarball), "."], "tar")
        changes = [f"--change={c}" for c in [*CHANGES, f"LABEL {RECIPE_LABEL}={recipe_hash()}"]]
        engine.docker("import", *changes, str(tarball), TAG, timeout=300)
    finally:
        _unmount(rootfs / "proc")
        shutil.rmtree(work, ignore_errors=True)


def _configure(rootfs: Path, main: AptSource, security: AptSource | None) -> None:
    """The image's own apt sources name the same mirrors (as the official image names deb.debian.org)."""
    stanzas = [f"Types: deb\nURIs: {main.uri}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"]
    if security:
        stanzas.append(f"Types: deb\nURIs: {security.uri}\nSuites: {SUITE}-security\nComponents: main\n")
    signed = "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(s + signed for s in stanzas))
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG_CFG)
    # Like the official image: pip may install (the venv-from-PEX build does not need it, other images may).
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)


def _upgrade(rootfs: Path) -> None:
    """bookworm-updates and bookworm-security: debootstrap only read the release suite."""
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
    policy.chmod(0o755)
    (rootfs / "proc").mkdir(exist_ok=True)
    _run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], "mount /proc")
    try:
        chroot = ["chroot", str(rootfs), "env", "DEBIAN_FRONTEND=noninteractive"]
        _run([*chroot, "apt-get", "update", "-q"], "apt-get update (chroot)")
        _run([*chroot, "apt-get", "upgrade", "-y", "-q"], "apt-get upgrade (chroot)")
        _run([*chroot, "apt-get", "clean"], "apt-get clean (chroot)")
    finally:
        _unmount(rootfs / "proc")
        policy.unlink()


def _slim(rootfs: Path) -> None:
    for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/groff/*", "usr/share/lintian/*"):
        _remove(rootfs.glob(pattern))
    _remove(p for p in rootfs.glob("usr/share/locale/*") if p.name != "locale.alias")
    _remove(p for p in rootfs.glob("usr/share/doc/*/*") if p.name != "copyright")
    _remove(rootfs.glob("var/lib/apt/lists/*"))
    _remove(rootfs.glob("var/cache/apt/*.bin"))
    _remove(rootfs.glob("var/cache/debconf/*-old"))
    _remove(rootfs.glob("var/log/**/*.log"))
    _remove(rootfs.glob("var/log/apt/*"))
    _remove(rootfs.glob("tmp/*"))
    # The build machine's resolver and name: Docker provides both at run time.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / name).unlink(missing_ok=True)
        (rootfs / name).touch()


def _remove(paths: Iterable[Path]) -> None:
    for path in list(paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _unmount(point: Path) -> None:
    if point.is_mount():
        subprocess.run(["umount", str(point)], env=debian.system_env(), check=False)


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, env=debian.system_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed ({result.returncode}): " + " | ".join(tail))
