"""The part every certificate the emulators make shares: who it names, who signed it, when it is valid."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes


def builder(
    subject: x509.Name, issuer: x509.Name, public_key: CertificateIssuerPublicKeyTypes, days: int
) -> x509.CertificateBuilder:
    """A certificate valid from five minutes ago (tolerates clock skew) for `days`; add extensions, then sign."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
