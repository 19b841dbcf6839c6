"""The token issuer's public signing keys, fetched over HTTP and cached as its Cache-Control header says.

Google publishes them in two formats (v1: {kid: PEM certificate}; v3: JWKS); the local identity emulator serves
both. Fetches run off the event loop, one at a time, with a back-off during an outage so calls fail fast; stale
keys keep verifying, within a bound, while a fetch refreshes them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

_log = logging.getLogger("mesh.identity")
_MAX_DOCUMENT_BYTES = 1 << 20


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


@dataclass(frozen=True)
class _Fetch:
    """The one fetch in flight: done when it ends; every caller waiting for it stops waiting at `deadline`."""

    done: concurrent.futures.Future[None]
    deadline: float  # monotonic


class IssuerKeys:
    """The issuer's public keys by key id, fetched over HTTP and cached per Cache-Control max-age.

    Past max-age the keys are stale: still used, for up to `max_stale_s` more, while one fetch refreshes them
    in the background; past that they are dropped, and a call waits for a fetch (or fails UNAVAILABLE). At most
    one fetch runs at a time, on a daemon thread (a hanging endpoint never holds up the process's exit); every
    caller that waits for it stops at the same deadline, `timeout_s` after it began, instead of queueing for a
    timeout of its own.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        default_max_age_s: float,
        refetch_interval_s: float,
        failure_backoff_s: float,
        max_stale_s: float = 3600.0,
    ) -> None:
        self.url = url
        # How long a fetch may take, and how soon another may follow (after an unknown key id, or a failure).
        self._timeout_s, self._refetch_interval_s, self._failure_backoff_s = (
            timeout_s,
            refetch_interval_s,
            failure_backoff_s,
        )
        # How long keys are used: per the response's max-age (else the default), and at most this far past it.
        self._default_max_age_s, self._max_stale_s = default_max_age_s, max_stale_s
        self._lock = threading.Lock()  # guards the fields below; callers may be on several threads and loops
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fresh_until = 0.0  # monotonic
        self._fetch: _Fetch | None = None
        self._last_fetch = float("-inf")  # monotonic time of the last attempt
        self._last_failed = False
        self._outage_logged = False

    @property
    def keys(self) -> dict[str, rsa.RSAPublicKey]:
        """The keys to verify with: fresh or stale within the bound; empty past it."""
        if time.monotonic() >= self._fresh_until + self._max_stale_s:
            return {}
        return self._keys

    def fresh(self) -> bool:
        return bool(self._keys) and time.monotonic() < self._fresh_until

    def may_refetch_for_unknown_kid(self) -> bool:
        return time.monotonic() - self._last_fetch >= self._refetch_interval_s

    async def current(self) -> dict[str, rsa.RSAPublicKey]:
        """The keys to verify with now: fresh ones at once; stale ones at once while a fetch refreshes them in
        the background; with none usable, what a fetch brings (empty if it fails or runs out of time)."""
        if not self.fresh():
            if self.keys:
                self._start()
            else:
                await self._wait(self._start())
        return self.keys

    async def refresh(self, *, unknown_kid: bool = False) -> None:
        """Fetch now (for a key id not seen yet: at most once per refetch interval), or join the fetch in flight."""
        await self._wait(self._start(unknown_kid=unknown_kid))

    def _start(self, *, unknown_kid: bool = False) -> _Fetch | None:
        """The fetch in flight, or a new one; None when none is due (fresh keys, or backing off)."""
        with self._lock:
            if self._fetch is not None and not self._fetch.done.done():
                return self._fetch
            now = time.monotonic()
            if unknown_kid and not self.may_refetch_for_unknown_kid():
                return None
            if not unknown_kid and self.fresh():
                return None
            if self._last_failed and now - self._last_fetch < self._failure_backoff_s:
                return None  # fail fast during an outage
            self._last_fetch = now
            fetch = self._fetch = _Fetch(concurrent.futures.Future(), now + self._timeout_s)
        threading.Thread(target=self._run, args=(fetch,), name="issuer-keys", daemon=True).start()
        return fetch

    @staticmethod
    async def _wait(fetch: _Fetch | None) -> None:
        if fetch is None:
            return
        remaining = fetch.deadline - time.monotonic()
        # shield: a waiter's timeout must not cancel the fetch the others wait for.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fetch.done)), max(0.0, remaining))

    def _run(self, fetch: _Fetch) -> None:
        try:
            keys, max_age = self._fetch_keys(fetch.deadline)
        except Exception as exc:  # any failure means "no new keys"
            with self._lock:
                self._last_failed = True
                first = not self._outage_logged
                self._outage_logged = True
            if first:
                _log.warning(
                    "identity certs unreachable at %s (%s); %s",
                    self.url,
                    type(exc).__name__,
                    "using cached keys" if self.keys else "rejecting calls with UNAVAILABLE",
                )
        else:
            with self._lock:
                recovered = self._outage_logged
                self._last_failed = self._outage_logged = False
                self._keys = keys
                self._fresh_until = time.monotonic() + max_age
            if recovered:
                _log.warning("identity certs reachable again at %s", self.url)
        finally:
            fetch.done.set_result(None)

    def _fetch_keys(self, deadline: float) -> tuple[dict[str, rsa.RSAPublicKey], float]:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        # Each socket operation is bounded by the timeout; the whole fetch by the deadline, checked between
        # reads, so an endpoint that trickles its answer cannot hold the one fetch for long.
        with _opener.open(request, timeout=self._timeout_s) as response:  # config URL
            body = bytearray()
            while chunk := response.read1(64 * 1024):
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES or time.monotonic() > deadline:
                    raise TimeoutError("certs document too large or too slow")
            max_age = _max_age(response.headers.get("Cache-Control"), self._default_max_age_s)
        return _parse_keys(json.loads(body)), max_age


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
