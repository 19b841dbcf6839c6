"""The buf CLI, installed from npm's @bufbuild/buf at the version package-lock.json pins (with its integrity
hashes), once per lockfile, into ~/.cache/grpc-mesh/buf/<hash of the lock> (BUF_CACHE_DIR overrides), shared by
every clone and by Pants' test sandboxes. `npm ci --ignore-scripts`: npm checks every tarball against the
lock's sha512 and runs nothing from the packages (the `buf` launcher finds its platform binary without the
postinstall script). No other source of buf is reachable from our build machines (no GitHub releases).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

MANIFESTS = ("package.json", "package-lock.json")
INSTALL_TIMEOUT_S = 300


class NoBuf(Exception):
    """buf cannot be installed here; the message says why and what to do."""


def cache_root() -> Path:
    configured = os.environ.get("BUF_CACHE_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "grpc-mesh" / "buf"


def manifests() -> dict[str, bytes]:
    """package.json and package-lock.json as this package ships them (a resource in the PEX and in tests)."""
    package = resources.files("contracts")
    return {name: package.joinpath(name).read_bytes() for name in MANIFESTS}


def installed() -> Path:
    """The buf launcher of the pinned version: installed on first use, reused after."""
    files = manifests()
    key = hashlib.sha256(b"".join(files[name] for name in MANIFESTS)).hexdigest()[:16]
    home = cache_root() / key
    launcher = home / "node_modules" / ".bin" / "buf"
    if launcher.exists():
        return launcher
    npm = shutil.which("npm")
    if npm is None:
        raise NoBuf("npm is not on PATH: install Node.js and npm (Debian: apt-get install nodejs npm)")
    home.parent.mkdir(parents=True, exist_ok=True)
    # Installed beside its final place and renamed into it: concurrent first runs never see half an install.
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=home.parent))
    try:
        for name, data in files.items():
            (scratch / name).write_bytes(data)
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise NoBuf(f"npm ci of @bufbuild/buf failed (exit {result.returncode}): {detail}")
        try:
            scratch.rename(home)
        except OSError:  # another run installed it first
            if not launcher.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return launcher
