"""Server-side identity: verify the caller's Google ID token and make the caller visible to handlers.

`TokenVerifier` checks an RS256 ID token against the issuer's published certs (cached per their
Cache-Control max-age, refetched once on an unknown key id), its audience, issuer and times, then the
caller's email against an optional allow-list. Verified tokens are cached until they expire, so a caller
that reuses its token (as mesh.client's IdTokens does) pays a dict lookup per call, not an RSA verification.
mesh.server._chain applies it (`admitter`) to every RPC of a server except the exempt methods.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mesh.probes import HEALTH
from mesh.server._calls import Metadata, Pending, Refusal
from mesh.server._issuer_keys import IssuerKeys, b64decode
from mesh.settings import GOOGLE_CERTS_URL, GOOGLE_ISSUERS

# With verification on, only what probes call takes no token: Cloud Run's gRPC startup and liveness probes
# call Check. Watch holds a stream open and reflection describes every method: both need a token.
EXEMPT_METHODS = (f"/{HEALTH}/Check",)
MAX_TOKEN_BYTES = 8192

_log = logging.getLogger("mesh.identity")  # the name operators filter on, as before the move


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made the current call, as the verified ID token says."""

    email: str | None
    subject: str
    audience: str
    issuer: str
    expires_at: float  # seconds since the epoch
    issued_at: float
    authorized_party: str | None = None


_current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("mesh_caller", default=None)


def current_caller() -> Caller | None:
    """The verified caller of the RPC being handled; None when the method is exempt or auth is off."""
    return _current_caller.get()


class AuthError(Exception):
    """A verification failure: the gRPC status to answer with and a message free of token material."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


def _segment(segment: str, what: str) -> bytes:
    """A JWT segment's bytes, from its canonical base64url only (RFC 7515: no padding, `-_` not `+/`, zero
    trailing bits): any other spelling of the same bytes is refused, so one token has exactly one string, and
    one caller cannot fill the verified-token cache with variants of a single token."""
    try:
        data = b64decode(segment)
    except ValueError:  # binascii.Error
        raise _unauthenticated(f"malformed token: {what} is not base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=") != segment.encode("ascii"):
        raise _unauthenticated(f"malformed token: {what} is not canonical base64url")
    return data


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    data = _segment(segment, what)
    try:
        value = json.loads(data)
    # ValueError covers UnicodeDecodeError; RecursionError is JSON nested too deep.
    except (ValueError, RecursionError):
        raise _unauthenticated(f"malformed token: {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise _unauthenticated(f"malformed token: {what} is not a JSON object")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _unauthenticated(f"malformed token: claim {name!r} missing or not a number")
    return float(value)


class TokenVerifier:
    """Verifies Google-style RS256 ID tokens for one audience; safe to share across calls and loops."""

    def __init__(
        self,
        audience: str,
        certs_url: str = GOOGLE_CERTS_URL,
        issuers: Iterable[str] = GOOGLE_ISSUERS,
        allowed_callers: frozenset[str] | None = None,
        *,
        clock_skew_s: float = 30.0,
        certs_timeout_s: float = 5.0,
        default_certs_max_age_s: float = 300.0,
        refetch_interval_s: float = 5.0,
        failure_backoff_s: float = 1.0,
        certs_max_stale_s: float = 3600.0,
        cache_size: int = 4096,
        max_token_bytes: int = MAX_TOKEN_BYTES,
    ) -> None:
        if not audience:
            raise ValueError("an audience is required to verify ID tokens")
        self.audience = audience
        self.issuers = frozenset(issuers)
        # Email addresses are case-insensitive (Google's are lower-cased); compared lower-cased.
        self.allowed_callers = (
            None if allowed_callers is None else frozenset(email.lower() for email in allowed_callers)
        )
        self._skew = clock_skew_s
        self._certs = IssuerKeys(
            certs_url,
            certs_timeout_s,
            default_certs_max_age_s,
            refetch_interval_s,
            failure_backoff_s,
            certs_max_stale_s,
        )
        self._cache: OrderedDict[str, Caller] = OrderedDict()
        self._cache_size = cache_size
        self._max_token_bytes = max_token_bytes

    async def verify(self, token: str) -> Caller:
        """The caller the token proves, or AuthError (UNAUTHENTICATED, PERMISSION_DENIED or UNAVAILABLE)."""
        caller = self.known(token)
        if caller is None:
            caller = await self._verify_uncached(token)
            self._cache[token] = caller
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self._check_allowed(caller)
        return caller

    def known(self, token: str) -> Caller | None:
        """The caller of a token verified before (no coroutine: the per-call path), None for a new token, or
        AuthError when it has expired since or its caller is not allowed."""
        caller = self._cache.get(token)
        if caller is None:
            return None
        if time.time() > caller.expires_at + self._skew:
            self._cache.pop(token, None)
            raise _unauthenticated("token expired")
        try:
            self._cache.move_to_end(token)
        except KeyError:  # evicted meanwhile by another thread's call (the threads model): still verified
            pass
        self._check_allowed(caller)
        return caller

    def _check_allowed(self, caller: Caller) -> None:
        if self.allowed_callers is not None and (caller.email or "").lower() not in self.allowed_callers:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, f"caller not allowed: {caller.email or caller.subject}"
            )

    async def _verify_uncached(self, token: str) -> Caller:
        if len(token) > self._max_token_bytes:
            raise _unauthenticated(f"token too large (over {self._max_token_bytes} bytes)")
        if not token.isascii():  # a header value may carry any byte; base64url is ASCII
            raise _unauthenticated("malformed token: not ASCII")
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _unauthenticated("malformed token: expected header.payload.signature")
        header = _json_segment(parts[0], "header")
        if header.get("alg") != "RS256":
            raise _unauthenticated("unsupported token algorithm: only RS256 is accepted")
        claims = _json_segment(parts[1], "payload")  # parsed for well-formedness; trusted only once signed
        signature = _segment(parts[2], "signature")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _unauthenticated("malformed token: kid is not a string")
        keys = await self._keys_for(kid)
        signed = (parts[0] + "." + parts[1]).encode("ascii")
        if not any(_signature_ok(key, signature, signed) for key in keys):
            raise _unauthenticated("invalid token signature")
        return self._check_claims(claims)

    async def _keys_for(self, kid: str | None) -> list[rsa.RSAPublicKey]:
        certs = self._certs
        keys = await certs.current()
        if not keys:
            raise AuthError(grpc.StatusCode.UNAVAILABLE, "cannot verify tokens: identity certs unavailable")
        if kid is None:
            return list(keys.values())
        key = keys.get(kid)
        if key is None and certs.may_refetch_for_unknown_kid():  # the issuer may have rotated its keys
            await certs.refresh(unknown_kid=True)
            key = certs.keys.get(kid)
        if key is None:
            raise _unauthenticated("token signed with an unknown key")
        return [key]

    def _check_claims(self, claims: Mapping[str, Any]) -> Caller:
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self.issuers:  # a list is not hashable
            raise _unauthenticated(f"issuer mismatch: expected one of {', '.join(sorted(self.issuers))}")
        audience = claims.get("aud")
        if audience != self.audience and not (isinstance(audience, list) and self.audience in audience):
            raise _unauthenticated(f"audience mismatch: expected {self.audience}")
        now = time.time()
        expires_at = _number(claims, "exp")
        issued_at = _number(claims, "iat")
        if now > expires_at + self._skew:
            raise _unauthenticated("token expired")
        if issued_at > now + self._skew:
            raise _unauthenticated("token not yet valid: issued in the future")
        if "nbf" in claims and _number(claims, "nbf") > now + self._skew:
            raise _unauthenticated("token not yet valid (nbf)")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _unauthenticated("malformed token: claim 'sub' missing")
        email = claims.get("email")
        # An email counts only when the issuer vouches for it.
        if not isinstance(email, str) or claims.get("email_verified") not in (True, "true"):
            email = None
        azp = claims.get("azp")
        return Caller(
            email=email,
            subject=subject,
            audience=self.audience,
            issuer=str(issuer),
            expires_at=expires_at,
            issued_at=issued_at,
            authorized_party=azp if isinstance(azp, str) else None,
        )


def _signature_ok(key: rsa.RSAPublicKey, signature: bytes, signed: bytes) -> bool:
    try:
        key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


_MISSING = "missing credentials: send 'authorization: Bearer <ID token>' (or 'x-serverless-authorization')"
_CREDENTIAL_HEADERS = ("x-serverless-authorization", "authorization")


def bearer_token(metadata: Metadata | None) -> str:
    """The token from x-serverless-authorization (Cloud Run leaves `authorization` to the app) or authorization.

    A header sent more than once is refused: which copy counts would otherwise depend on who reads it (a proxy
    and this server could each see another caller)."""
    found: dict[str, str | bytes] = {}
    for key, value in metadata or ():
        if key in _CREDENTIAL_HEADERS:
            if key in found:
                raise _unauthenticated(f"malformed credentials: more than one {key!r} header")
            found[key] = value
    credentials = found.get("x-serverless-authorization")
    if credentials is None:
        credentials = found.get("authorization")
    if not isinstance(credentials, str) or credentials[:7].lower() != "bearer ":
        raise _unauthenticated(_MISSING)
    return credentials[7:].strip()


# Admits a call from its context and metadata: None when done at once, else what the call settles first.
Admit = Callable[[Any, Metadata], Pending | Refusal | None]


def admitter(verifier: TokenVerifier, method: str) -> Admit:
    """What admits a call of `method`, from its context and metadata: makes its verified caller current, or
    refuses the call with the AuthError's status (logged, without token material).

    It runs inside the handler's own context, so the caller is visible to the handler and to nothing else. A
    token verified before is admitted at once; a new one is what the call settles before its handler.
    """

    def admit(context: Any, metadata: Metadata) -> Pending | Refusal | None:
        try:
            token = bearer_token(metadata)
            caller = verifier.known(token)
        except AuthError as error:
            return _refusal(method, error)
        if caller is None:
            return _NewToken(verifier, token, method)
        _current_caller.set(caller)
        return None

    return admit


@dataclass(frozen=True, slots=True)
class _NewToken:
    """A token not verified before: verified (awaited by the call, or on the process's event loop for a call
    on a thread: the serving model decides) before the call's handler runs."""

    verifier: TokenVerifier
    token: str
    method: str

    async def check(self) -> Caller | AuthError:
        try:
            return await self.verifier.verify(self.token)
        except AuthError as error:
            return error

    def settle(self, checked: Caller | AuthError) -> Refusal | None:
        if isinstance(checked, AuthError):
            return _refusal(self.method, checked)
        _current_caller.set(checked)
        return None


def _refusal(method: str, error: AuthError) -> Refusal:
    _log.info("rejected call to %s: %s (%s)", method, error.code.name, error.message)
    return Refusal(error.code, error.message)
