"""The caller's ID tokens, minted through google-auth and cached per audience, as the `authorization` metadata
the client chain (ClientChain) adds to each outgoing call.

google-auth finds the identity (service-account key in GOOGLE_APPLICATION_CREDENTIALS, impersonation, or
the metadata server) and deems a token stale about 3m45s before it expires. This module keeps one credential
per audience for the life of its owner, so every call to an audience reuses one token instead of minting
one per call (the Cloud Run grpc-ping sample's open bug). The metadata is handed to the chain, not attached
as gRPC call credentials: gRPC runs a call credential's plugin on a new thread for every call, which costs
about as much as the call itself; here a call whose token is fresh pays a dict lookup.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from google.auth.credentials import Credentials, TokenState

from mesh.settings import target_host


class NoCredentialsError(RuntimeError):
    """No identity could be found to mint ID tokens with."""


def audience_for(target: str) -> str:
    """The audience Cloud Run expects for a `host:port` target: `https://host` (the port dropped)."""
    try:
        return "https://" + target_host(target)
    except ValueError:
        raise ValueError(f"cannot derive a token audience from target {target!r}") from None


# The user information of a URL (`scheme://user:secret@host`): google-auth names the metadata URL it failed to
# read in its messages, and the local identity emulator's carries the account's secret there.
_USERINFO = re.compile(r"(?<=://)[^/\s@]*@")


def described(exc: BaseException) -> str:
    """`Type: message` of a google-auth failure, for a log or a status, with no URL's user information."""
    return _USERINFO.sub("", f"{type(exc).__name__}: {exc}")


T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
_log = logging.getLogger(__name__)
_FRESH_RECHECK_S = 1.0


def _in_daemon_thread(work: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Runs blocking google-auth work (HTTP with its own retries) on a daemon thread: a mint stuck on an
    unreachable metadata server must not hold up the process's exit after SIGTERM."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=run, name="id-token", daemon=True).start()
    return future


class _IdToken:
    """One audience's token, as metadata: a cheap path for every call and a single minter at a time.

    While google-auth says the token is fresh the prepared header is handed back at once; otherwise one
    thread refreshes (through google-auth) while concurrent calls either reuse the still-valid stale token or
    wait for the new one.
    """

    def __init__(self, credentials: Credentials, request: Any) -> None:
        self._credentials = credentials
        self._request = request
        self._refresh_lock = threading.Lock()
        self._token: str | None = None
        self._metadata: Metadata = ()
        # time.monotonic() until which the token counts as fresh without asking google-auth again.
        self._fresh_until = 0.0

    def cached(self) -> Metadata | None:
        """The prepared metadata while google-auth deems the token fresh; None when it needs a refresh.

        google-auth's verdict (two clock reads and datetime arithmetic) is taken at most every
        `_FRESH_RECHECK_S` per token: a token turns stale minutes before it expires, so one deemed fresh a
        second ago is still valid, and this runs on every call."""
        credentials = self._credentials
        if self._token is not None and credentials.token is self._token:
            now = time.monotonic()
            if now < self._fresh_until:
                return self._metadata
            if credentials.token_state is TokenState.FRESH:
                self._fresh_until = now + _FRESH_RECHECK_S
                return self._metadata
        return None

    def stale(self) -> Metadata | None:
        """The prepared metadata while the token is stale (google-auth wants a new one) but still valid."""
        if self._token is not None and self._credentials.token is self._token:
            if self._credentials.token_state is TokenState.STALE:
                return self._metadata
        return None

    def refreshed(self) -> Metadata:
        """Blocking: the metadata after google-auth refreshed the token if needed; one minter at a time.

        While a stale (still valid) token is being replaced by another thread, it is returned at once.
        """
        credentials = self._credentials
        acquired = False
        if self._token is not None and credentials.token is self._token:
            if credentials.token_state is TokenState.STALE:
                acquired = self._refresh_lock.acquire(blocking=False)
                if not acquired:
                    return self._metadata
        if not acquired:  # first use or expired: every caller waits for the one mint
            self._refresh_lock.acquire()
        try:
            headers: dict[str, str] = {}
            # google-auth refreshes here if needed (the method and URL matter only to other credentials).
            credentials.before_request(self._request, "", "", headers)
            headers.pop("x-goog-api-client", None)  # google-auth's usage metrics, not for our callees
            self._metadata = tuple((k.lower(), v) for k, v in headers.items())
            self._token = credentials.token  # after _metadata: cached() reads them in the other order
            return self._metadata
        finally:
            self._refresh_lock.release()


class IdTokens:
    """Owner of the ID tokens of one process: one google-auth credential per audience."""

    def __init__(self, request: Any | None = None) -> None:
        # The HTTP transport (requests, urllib3: ~7 MB and ~90 ms of imports) only once a token is needed.
        self._request = request
        self._lock = threading.Lock()
        self._refreshing: dict[str, concurrent.futures.Future[Metadata]] = {}
        self._tokens: dict[str, _IdToken] = {}

    def prepare(self, audience: str) -> None:
        """Finds the identity for `audience` now: NoCredentialsError at start-up rather than on a call."""
        self._entry(audience)

    def cached(self, audience: str) -> Metadata | None:
        """The metadata for `audience` while its token is fresh (no coroutine: the per-call path), else None."""
        token = self._tokens.get(audience)
        return None if token is None else token.cached()

    async def metadata(self, audience: str, timeout: float | None = None) -> Metadata:
        """`(("authorization", "Bearer <token>"),)` for `audience`, to be sent with a call.

        A dict lookup while the token is fresh. A stale token (google-auth refreshes ahead of expiry) is used while one refresh runs in the background, so an
        unreachable metadata server costs nothing until the token really expires. Otherwise the caller waits
        for the (single, shared) mint, at most `timeout` seconds (asyncio.TimeoutError).
        """
        token = self._tokens.get(audience)
        if token is None:
            token = await asyncio.wait_for(
                asyncio.wrap_future(_in_daemon_thread(lambda: self._entry(audience))), timeout
            )
        cached = token.cached()
        if cached is not None:
            return cached
        refresh = self._refresh(audience, token)
        stale = token.stale()
        if stale is not None:
            return stale
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(refresh)), timeout)

    def _refresh(self, audience: str, token: _IdToken) -> concurrent.futures.Future[Metadata]:
        """The refresh in progress for `audience`, or a new one: never more than one at a time."""
        with self._lock:
            pending = self._refreshing.get(audience)
            if pending is None or pending.done():
                pending = _in_daemon_thread(token.refreshed)
                pending.add_done_callback(lambda f: self._report(audience, f))
                self._refreshing[audience] = pending
            return pending

    @staticmethod
    def _report(audience: str, refresh: concurrent.futures.Future[Metadata]) -> None:
        if not refresh.cancelled() and (exc := refresh.exception()) is not None:
            # google-auth's messages name the endpoint and status, never a token (nor, described, a secret).
            _log.warning("cannot mint an ID token for %s: %s", audience, described(exc))

    def _entry(self, audience: str) -> _IdToken:
        token = self._tokens.get(audience)
        if token is not None:
            return token
        if not audience:
            raise ValueError("an ID-token audience is required")
        with self._lock:
            token = self._tokens.get(audience)
            if token is None:
                if self._request is None:
                    import google.auth.transport.requests

                    self._request = google.auth.transport.requests.Request()
                token = _IdToken(self._discover(audience), self._request)
                self._tokens[audience] = token
        return token

    def _discover(self, audience: str) -> Credentials:
        import google.auth.exceptions
        import google.oauth2.id_token

        try:
            found: Credentials = google.oauth2.id_token.fetch_id_token_credentials(
                audience, request=self._request
            )
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise NoCredentialsError(
                "no identity to mint ID tokens with: set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
                "key file, run where a metadata server answers (Cloud Run, or the local identity emulator via "
                f"GCE_METADATA_HOST), or run unauthenticated for local development ({described(exc)})"
            ) from exc
        return found

    def close(self) -> None:
        with self._lock:
            self._tokens.clear()
