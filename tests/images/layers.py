"""What an image's layers hold that must never ship: private keys, tokens, credentials files.

Reads the archive `docker save` writes (one tar per layer inside) and reports each finding as
`layer: /path: why`. A PEM key in a file exactly as a Debian package shipped it (its md5 is in dpkg's own
md5sums: libgnutls carries its self-test keys) is Debian's published text, not a secret of ours.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

# A PEM block with a body: libraries (google-auth, rsa) name the markers in their code, which is not a key.
PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\s+[A-Za-z0-9+/=:,\-\s]{64,}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
)
CREDENTIAL_NAMES = {
    "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", ".netrc", ".git-credentials", ".pypirc", ".npmrc",
    "application_default_credentials.json", "credentials.json", "credentials.db", "access_tokens.db",
}  # fmt: skip
KEY_SUFFIXES = {".key", ".p12", ".pfx", ".jks", ".keystore"}
# Service-account key files and OAuth token caches, whatever their name.
SECRET_JSON_FIELDS = {"private_key", "refresh_token", "access_token", "client_secret"}
DPKG_MD5SUMS = re.compile(r"^var/lib/dpkg/info/[^/]+\.md5sums$")
MAX_SCANNED_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PemHit:
    layer: str
    path: str
    md5: str


@dataclass
class Scan:
    layers: int = 0
    files: int = 0
    findings: list[str] = field(default_factory=list)
    pem: list[PemHit] = field(default_factory=list)  # judged once every layer's dpkg md5sums are read
    debian: dict[str, str] = field(default_factory=dict)  # path -> md5, as Debian's packages shipped it

    def add(self, layer: str, path: str, why: str) -> None:
        self.findings.append(f"{layer}: /{path}: {why}")


def scan(saved: IO[bytes]) -> Scan:
    """Every layer of a `docker save` archive: Docker's own format (ID/layer.tar) or OCI's (blobs/sha256/*)."""
    result = Scan()
    with tarfile.open(fileobj=saved, mode="r:*") as image:
        for member in image.getmembers():
            if not (
                member.isfile() and (member.name.endswith("layer.tar") or member.name.startswith("blobs/"))
            ):
                continue
            layer = image.extractfile(member)
            assert layer is not None
            try:
                files = tarfile.open(fileobj=layer, mode="r:*")
            except tarfile.ReadError:
                continue  # an OCI blob that is a config or manifest, not a layer
            with files:
                result.layers += 1
                _scan_layer(member.name, files, result)
    for hit in result.pem:
        if result.debian.get(hit.path) != hit.md5:
            result.add(hit.layer, hit.path, "a PEM private key")
    return result


def _scan_layer(layer: str, files: tarfile.TarFile, result: Scan) -> None:
    for entry in files:
        if not entry.isfile():
            continue
        result.files += 1
        name = entry.name.removeprefix("./")
        path = PurePosixPath(name)
        if path.name in CREDENTIAL_NAMES or (path.parent.name == ".docker" and path.name == "config.json"):
            result.add(layer, name, "a credentials file")
            continue
        if path.suffix in KEY_SUFFIXES:
            result.add(layer, name, f"a key file ({path.suffix})")
            continue
        if entry.size > MAX_SCANNED_BYTES:
            continue
        data = files.extractfile(entry)
        content = data.read() if data else b""
        if DPKG_MD5SUMS.match(name):
            for line in content.decode(errors="replace").splitlines():
                md5, _, shipped = line.partition("  ")
                result.debian[shipped] = md5
        if PEM_PRIVATE_KEY.search(content):
            result.pem.append(PemHit(layer, name, hashlib.md5(content).hexdigest()))
        elif path.suffix == ".json" and _secret_fields(content):
            result.add(layer, name, "JSON with " + ", ".join(sorted(_secret_fields(content))))


def _secret_fields(content: bytes) -> set[str]:
    try:
        document = json.loads(content)
    except ValueError:
        return set()
    return SECRET_JSON_FIELDS & set(document) if isinstance(document, dict) else set()
