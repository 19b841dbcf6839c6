"""A development certificate authority for local TLS: a CA and one server certificate it signs.

For the local mesh and tests only. `ensure_dev_certs(DIR)` is idempotent: it reuses what DIR holds while
the server certificate is still signed by the CA there, covers the names asked for and has a month left;
otherwise it makes what is missing. Keys are written 0600. Run it: `python -m emulators.dev_ca DIR`.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulators import certificates

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
_CA_DAYS = 3650
_SERVER_DAYS = 365
_RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class DevCerts:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def ensure_dev_certs(directory: str | os.PathLike[str], extra_names: Iterable[str] = ()) -> DevCerts:
    """Creates (or reuses) the CA and a server certificate for localhost, 127.0.0.1, ::1 and extra_names."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = DevCerts(root / "ca.crt", root / "ca.key", root / "server.crt", root / "server.key")
    names = list(dict.fromkeys([*DEFAULT_NAMES, *extra_names]))
    # Several processes of the local mesh may start at once: one makes the files, the others reuse them.
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca_key, ca_cert = _load_or_make_ca(paths)
        if not _server_cert_usable(paths, ca_cert, names):
            _make_server_cert(paths, ca_key, ca_cert, names)
    return paths


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _load_or_make_ca(paths: DevCerts) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if paths.ca_cert.exists() and paths.ca_key.exists():
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and cert.not_valid_after_utc - _now() > _RENEW_BEFORE
            and cert.public_key() == key.public_key()
        ):
            return key, cert
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh development CA")])
    cert = (
        certificates.builder(name, name, key.public_key(), _CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(paths.ca_key, key)
    _write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def _server_cert_usable(paths: DevCerts, ca_cert: x509.Certificate, names: list[str]) -> bool:
    if not (paths.server_cert.exists() and paths.server_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    covered = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
    covered |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    wanted = {str(_as_ip(n) or n) for n in names}
    return (
        wanted <= covered
        and cert.public_key() == key.public_key()
        and cert.not_valid_after_utc - _now() > _RENEW_BEFORE
    )


def _make_server_cert(
    paths: DevCerts, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        ip = _as_ip(name)
        alt_names.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(name))
    cert = (
        certificates.builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            ca_cert.subject,
            key.public_key(),
            _SERVER_DAYS,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths.server_key, key)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(path, pem, 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (a key is never readable by others, even briefly), then renamed in.
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed a certificate's mode
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.dev_ca", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--name", action="append", default=[], help="extra DNS name or IP (repeatable)")
    args = parser.parse_args(argv)
    certs = ensure_dev_certs(args.directory, args.name)
    print(json.dumps({k: str(v) for k, v in asdict(certs).items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
