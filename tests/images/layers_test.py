"""No private key, token or credentials file in any layer of a service image (the base's layers included)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.daemon import Engine
from tests.images.conftest import SERVICES
from tests.images.containers import ServiceImage
from tests.images.layers import scan


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_secrets_in_any_layer(
    service: str, engine: Engine, images: dict[str, ServiceImage], tmp_path: Path
) -> None:
    saved = tmp_path / "image.tar"
    engine.docker("save", f"--output={saved}", images[service].tag)
    with saved.open("rb") as archive:
        result = scan(archive)
    assert result.findings == []
    # The scan saw the image: the base's layer, the user's, the venv's, thousands of files.
    assert result.layers >= 3 and result.files > 1000


def _tar(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_scan_finds_planted_secrets_and_passes_code_that_names_key_markers() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    shipped = b"\x7fELF" + key  # a library with a self-test key, as its Debian package has it
    digest = hashlib.md5(shipped).hexdigest()
    layer = _tar(
        {
            "app/lib/deploy/sa.pem": key,
            "app/.netrc": b"machine example login x password y\n",
            "app/creds.json": json.dumps({"type": "service_account", "private_key": "..."}).encode(),
            # What google-auth's own code holds: the markers, no key.
            "app/lib/google/auth/crypt/_python_rsa.py": b'_PKCS8_MARKER = ("-----BEGIN PRIVATE KEY-----",\n'
            b' "-----END PRIVATE KEY-----")\n',
            "etc/ssl/certs/ca.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            # Exactly as a Debian package shipped it (self-test keys in a library), and one changed since.
            "usr/lib/libselftest.so": shipped,
            "usr/lib/libchanged.so": shipped + b"patched",
            "var/lib/dpkg/info/libselftest.md5sums": (
                f"{digest}  usr/lib/libselftest.so\n{digest}  usr/lib/libchanged.so\n"
            ).encode(),
        }
    )
    saved = _tar({"abc123/layer.tar": layer, "manifest.json": b"[]"})
    result = scan(io.BytesIO(saved))
    assert sorted(f.split(": ", 1)[1] for f in result.findings) == [
        "/app/.netrc: a credentials file",
        "/app/creds.json: JSON with private_key",
        "/app/lib/deploy/sa.pem: a PEM private key",
        "/usr/lib/libchanged.so: a PEM private key",
    ]
    assert (result.layers, result.files) == (1, 8)
