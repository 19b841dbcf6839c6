"""The token issuer's public signing keys, fetched over HTTP and cached as its Cache-Control header says.

Google publishes them in two formats (v1: {kid: PEM certificate}; v3: JWKS); the local identity emulator serves
both. Fetches run off the event loop, one at a time, with a back-off during an outage so calls fail fast.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import urllib.request
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

_log = logging.getLogger("mesh.identity")


class RedirectRefused(Exception):
    """The certs endpoint answered with a redirect: keys come from the configured URL or from nowhere."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could take the fetch to another host or from https to http, where anyone on the path could
    # serve keys of their own.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise RedirectRefused(f"HTTP {code} redirect refused")


_opener = urllib.request.build_opener(_NoRedirects)


def b64decode(segment: str) -> bytes:
    """Strict base64url: the padding JWTs strip is restored; any other character is an error."""
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


class IssuerKeys:
    """The issuer's public keys by key id, fetched over HTTP and cached per Cache-Control max-age."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        default_max_age_s: float,
        refetch_interval_s: float,
        failure_backoff_s: float,
    ) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._default_max_age_s = default_max_age_s
        self._refetch_interval_s = refetch_interval_s
        self._failure_backoff_s = failure_backoff_s
        self._lock = threading.Lock()  # fetches run in worker threads; one at a time
        self.keys: dict[str, rsa.RSAPublicKey] = {}
        self._fresh_until = 0.0
        self._last_fetch = float("-inf")  # monotonic time of the last attempt
        self._last_failed = False
        self._outage_logged = False

    def fresh(self) -> bool:
        return bool(self.keys) and time.monotonic() < self._fresh_until

    def may_refetch_for_unknown_kid(self) -> bool:
        return time.monotonic() - self._last_fetch >= self._refetch_interval_s

    async def refresh(self, *, unknown_kid: bool = False) -> None:
        await asyncio.to_thread(self._refresh_blocking, unknown_kid)

    def _refresh_blocking(self, unknown_kid: bool) -> None:
        with self._lock:
            now = time.monotonic()
            # Another thread may have fetched while this one waited for the lock.
            if unknown_kid and not self.may_refetch_for_unknown_kid():
                return
            if not unknown_kid and self.fresh():
                return
            if self._last_failed and now - self._last_fetch < self._failure_backoff_s:
                return  # fail fast during an outage instead of queueing one timeout per call
            self._last_fetch = now
            try:
                keys, max_age = self._fetch()
            except Exception as exc:  # noqa: BLE001 - any failure means "no new keys"
                self._last_failed = True
                if not self._outage_logged:
                    self._outage_logged = True
                    _log.warning(
                        "identity certs unreachable at %s (%s); %s",
                        self.url,
                        type(exc).__name__,
                        "using cached keys" if self.keys else "rejecting calls with UNAVAILABLE",
                    )
                return
            if self._outage_logged:
                _log.warning("identity certs reachable again at %s", self.url)
            self._last_failed = self._outage_logged = False
            self.keys = keys
            self._fresh_until = time.monotonic() + max_age

    def _fetch(self) -> tuple[dict[str, rsa.RSAPublicKey], float]:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with _opener.open(request, timeout=self._timeout_s) as response:  # noqa: S310 - config URL
            body = json.loads(response.read(1 << 20))
            max_age = _max_age(response.headers.get("Cache-Control"), self._default_max_age_s)
        return _parse_keys(body), max_age


def _max_age(cache_control: str | None, default: float) -> float:
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() == "max-age" and value.strip().isdigit():
            return float(value)
    return default


def _parse_keys(body: Any) -> dict[str, rsa.RSAPublicKey]:
    """Google's v1 format ({kid: PEM certificate}) or a JWKS ({"keys": [{kid, n, e}]})."""
    keys: dict[str, rsa.RSAPublicKey] = {}
    if isinstance(body, dict) and isinstance(body.get("keys"), list):
        for jwk in body["keys"]:
            if isinstance(jwk, dict) and jwk.get("kty") == "RSA" and isinstance(jwk.get("kid"), str):
                n = int.from_bytes(b64decode(jwk["n"]), "big")
                e = int.from_bytes(b64decode(jwk["e"]), "big")
                keys[jwk["kid"]] = rsa.RSAPublicNumbers(e, n).public_key()
    elif isinstance(body, dict):
        for kid, pem in body.items():
            public_key = x509.load_pem_x509_certificate(str(pem).encode()).public_key()
            if isinstance(public_key, rsa.RSAPublicKey):
                keys[str(kid)] = public_key
    if not keys:
        raise ValueError("no RSA keys in the certs document")
    return keys
