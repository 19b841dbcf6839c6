"""Outgoing ID-token call credentials, minted through google-auth and cached per audience.

google-auth finds the identity (service-account key in GOOGLE_APPLICATION_CREDENTIALS, impersonation, or
the metadata server) and refreshes a token about 3m45s before it expires. This module keeps one credential
per audience for the life of its owner, so every call to an audience reuses one token instead of minting
one per call (the Cloud Run grpc-ping sample's open bug).
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.id_token
import grpc
from google.auth.credentials import Credentials, TokenState
from google.auth.transport.grpc import AuthMetadataPlugin


class NoCredentialsError(RuntimeError):
    """No identity could be found to mint ID tokens with."""


def audience_for(target: str) -> str:
    """The audience Cloud Run expects for a `host:port` target: `https://host` (the port dropped)."""
    host = target.strip()
    if "://" in host:
        host = host.split("://", 1)[1].lstrip("/")  # dns:///host:port names no authority
    host = host.split("/", 1)[0]
    if host.startswith("["):  # [v6]:port
        host = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    elif host.count(":") > 1 and _is_ip(host):  # a bare IPv6 address has no port
        host = f"[{host}]"
    if not host or host == "[]":
        raise ValueError(f"cannot derive a token audience from target {target!r}")
    return "https://" + host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _IdTokenPlugin(AuthMetadataPlugin):  # type: ignore[misc]
    """google-auth's plugin with a cheap path for every call and a single minter at a time.

    gRPC runs the plugin for every RPC, on its own thread. While google-auth says the token is fresh the
    prepared header is handed back at once; otherwise one thread refreshes (through google-auth) while
    concurrent calls either reuse the still-valid stale token or wait for the new one.
    """

    def __init__(self, credentials: Credentials, request: Any) -> None:
        super().__init__(credentials, request, suppress_metrics_header=True)
        self._refresh_lock = threading.Lock()
        self._token: str | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        credentials = self._credentials
        state = credentials.token_state
        current = self._token is not None and credentials.token is self._token
        if current and state is TokenState.FRESH:
            callback(self._metadata, None)
            return
        acquired = False
        if current and state is TokenState.STALE:
            acquired = self._refresh_lock.acquire(blocking=False)
            if not acquired:  # another thread is refreshing; the stale token is still valid
                callback(self._metadata, None)
                return
        if not acquired:  # first use or expired: every caller waits for the one mint
            self._refresh_lock.acquire()
        try:
            headers = self._get_authorization_headers(context)  # google-auth refreshes here if needed
            self._metadata = tuple((k.lower(), v) for k, v in headers)
            self._token = credentials.token  # after _metadata: the fast path reads them in this order
        except Exception as exc:  # noqa: BLE001 - gRPC fails the call with this; keep the reason
            # google-auth's messages name the endpoint and status, never a token.
            callback((), RuntimeError(f"cannot mint an ID token: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._refresh_lock.release()
        callback(self._metadata, None)


class IdTokens:
    """Owner of the ID-token credentials of one process: one google-auth credential per audience."""

    def __init__(self, request: Any | None = None) -> None:
        self._request = request or google.auth.transport.requests.Request()
        self._lock = threading.Lock()
        self._credentials: dict[str, tuple[Credentials, grpc.CallCredentials]] = {}

    def credentials(self, audience: str) -> grpc.CallCredentials:
        """Call credentials that attach `authorization: Bearer <ID token for audience>` to every call."""
        return self._entry(audience)[1]

    def id_token_credentials(self, audience: str) -> Credentials:
        """The google-auth credential behind `credentials(audience)` (for inspection and tests)."""
        return self._entry(audience)[0]

    def _entry(self, audience: str) -> tuple[Credentials, grpc.CallCredentials]:
        entry = self._credentials.get(audience)
        if entry is not None:
            return entry
        if not audience:
            raise ValueError("an ID-token audience is required")
        with self._lock:
            entry = self._credentials.get(audience)
            if entry is None:
                google_credentials = self._discover(audience)
                plugin = _IdTokenPlugin(google_credentials, self._request)
                entry = (google_credentials, grpc.metadata_call_credentials(plugin, name="id-token"))
                self._credentials[audience] = entry
        return entry

    def _discover(self, audience: str) -> Credentials:
        try:
            return google.oauth2.id_token.fetch_id_token_credentials(audience, request=self._request)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise NoCredentialsError(
                "no identity to mint ID tokens with: set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
                "key file, run where a metadata server answers (Cloud Run, or the local identity emulator via "
                f"GCE_METADATA_HOST), or run unauthenticated for local development ({exc})"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._credentials.clear()
