"""A local stand-in for Cloud Run's metadata-server identity endpoint and Google's certs endpoint.

For tests and the local mesh only, never production. Each service account gets its own loopback
listener, as each Cloud Run service has its own metadata server; google-auth finds it through
`GCE_METADATA_HOST`/`GCE_METADATA_IP` (see `env_for`) and runs its real code path against it.
One shared listener serves the signing keys, as Google's certs endpoints do.

A metadata server answers only who was given its account's secret: on Cloud Run only the instance can reach
its metadata server, here every local process and user (and every host-network container) can reach
loopback. google-auth lets a caller set nothing but the host string, which it pastes into
`http://{host}/computeMetadata/v1/`, and requests (google-auth's HTTP transport) sends a URL's user
information as HTTP basic authentication; so `env_for` gives `GCE_METADATA_HOST=metadata:SECRET@127.0.0.1:PORT`
and anything that comes without the secret gets 403. Whoever can read the environment of a process given
it (its own user, root) or the launcher's state can mint for that account; no one else can.

Run it: `python -m emulators.identity --account a@p.iam.gserviceaccount.com` prints one JSON line with
the addresses, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import secrets
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from emulators import certificates

GOOGLE_ISSUER = "https://accounts.google.com"


@dataclass(frozen=True)
class Names:
    """How an emulated project names its services' accounts and audiences.

    On Cloud Run an audience is the service's https://NAME-HASH.a.run.app URL; locally every host is
    localhost, so a name per service under `domain` keeps a token for one service from being accepted by
    another."""

    project: str
    domain: str

    def account(self, service: str) -> str:
        return f"{service}@{self.project}.iam.gserviceaccount.com"

    def audience(self, service: str) -> str:
        return f"https://{service}.{self.domain}"


_FLAVOR = "Google"
# The user name of the basic authentication that carries an account's secret (any name would do).
_SECRET_USER = "metadata"
_NO_SECRET = (
    "This metadata server answers only the processes the local mesh started for its account: the request "
    "did not carry the account's secret (GCE_METADATA_HOST=metadata:SECRET@127.0.0.1:PORT, given only to "
    "those processes).\n"
)
_IDENTITY_PREFIX = "/computeMetadata/v1/instance/service-accounts/"


@dataclass(frozen=True)
class SigningKey:
    """An RSA key with its key id and a self-signed certificate, as Google publishes them."""

    kid: str
    private_key: rsa.RSAPrivateKey
    cert_pem: str

    @classmethod
    def generate(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = uuid.uuid4().hex
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kid)])
        cert = certificates.builder(name, name, key.public_key(), days=14).sign(key, hashes.SHA256())
        return cls(kid, key, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))

    def jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_jwt(header: Mapping[str, Any], payload: Mapping[str, Any], key: SigningKey) -> str:
    """Signs per header["alg"]: RS256 normally; "none" and HS256 (keyed with the public cert, the classic
    algorithm-confusion forgery) exist so tests can forge what a verifier must reject."""
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    ).encode("ascii")
    alg = header.get("alg")
    if alg == "RS256":
        signature = key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "HS256":
        signature = hmac.new(key.cert_pem.encode(), signing_input, hashlib.sha256).digest()
    else:
        signature = b""
    return signing_input.decode("ascii") + "." + _b64(signature)


class _Server(ThreadingHTTPServer):
    # Non-daemon request threads so server_close() joins them: no thread outlives stop().
    daemon_threads = False
    allow_reuse_address = True


class _Listener:
    """One ThreadingHTTPServer on 127.0.0.1 served by one thread; restartable on the same port."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: IdentityEmulator, account: str = ""):
        self._handler = handler
        self._owner = owner
        self._account = account
        # Kept across restarts, like the port: the processes given it keep working.
        self.secret = secrets.token_urlsafe(32)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        with self._lock:
            if self._server is None:
                self._start()

    def _start(self) -> None:
        server = _Server(("127.0.0.1", self.port), self._handler)
        server.emulator = self._owner  # type: ignore[attr-defined]
        server.account_email = self._account  # type: ignore[attr-defined]
        server.authorization = basic_authorization(self.secret)  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server, self._thread = None, None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()

    @property
    def running(self) -> bool:
        return self._server is not None


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no handler thread lingers on an idle keep-alive.
    protocol_version = "HTTP/1.0"
    timeout = 5
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        """Quiet: tests and the mesh read their own logs, not an access log."""

    def _send(
        self, status: int, body: str | bytes, content_type: str, headers: Mapping[str, str] = {}
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _MetadataHandler(_Handler):
    """Answers what google-auth asks a metadata server, for the account this listener belongs to."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        # google-auth POSTs to the identity endpoint when it binds tokens to a certificate; drain the body.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        self._answer()

    def _answer(self) -> None:
        emulator: IdentityEmulator = self.server.emulator
        email: str = self.server.account_email
        flavored = {"Metadata-Flavor": _FLAVOR}
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        given = self.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), self.server.authorization.encode()):
            self._send(403, _NO_SECRET, "text/plain", flavored)
            return
        if url.path == "/":
            self._send(200, "computeMetadata/\n", "application/text", flavored)
            return
        if self.headers.get("Metadata-Flavor") != _FLAVOR:
            self._send(403, "Missing Metadata-Flavor: Google header.\n", "text/html", flavored)
            return
        path = url.path
        if path == "/computeMetadata/v1/project/project-id":
            self._send(200, emulator.project_id, "application/text", flavored)
            return
        if path == "/computeMetadata/v1/universe/universe-domain":
            self._send(200, "googleapis.com", "application/text", flavored)
            return
        if path.startswith(_IDENTITY_PREFIX):
            account, _, leaf = path[len(_IDENTITY_PREFIX) :].partition("/")
            if account not in ("default", email):
                self._send(404, "Not found.\n", "text/html", flavored)
                return
            if leaf == "" and query.get("recursive") == "true":
                info = {"aliases": ["default"], "email": email, "scopes": emulator.scopes}
                self._send(200, json.dumps(info), "application/json", flavored)
                return
            if leaf == "email":
                self._send(200, email, "application/text", flavored)
                return
            if leaf == "identity":
                audience = query.get("audience")
                if not audience:
                    self._send(400, "non-empty audience parameter required\n", "text/html", flavored)
                    return
                token = emulator._issue(email, audience, full=query.get("format") == "full")
                self._send(200, token, "application/text", flavored)
                return
            if leaf == "token":
                access = {"access_token": "emulated-" + uuid.uuid4().hex, "expires_in": 3599}
                access["token_type"] = "Bearer"
                self._send(200, json.dumps(access), "application/json", flavored)
                return
        self._send(404, "Not found.\n", "text/html", flavored)


class _CertsHandler(_Handler):
    def do_GET(self) -> None:
        emulator: IdentityEmulator = self.server.emulator
        path = urlsplit(self.path).path
        cache = {"Cache-Control": f"public, max-age={emulator.certs_max_age_s}"}
        if path == "/oauth2/v1/certs":
            emulator._count_certs()
            self._send(200, json.dumps(emulator._published_pems()), "application/json", cache)
        elif path == "/oauth2/v3/certs":
            emulator._count_certs()
            self._send(200, json.dumps({"keys": emulator._published_jwks()}), "application/json", cache)
        else:
            self._send(404, "Not found.\n", "text/html")


class IdentityEmulator:
    """Mints RS256 ID tokens for local service accounts and publishes the keys that verify them."""

    def __init__(
        self,
        *,
        issuer: str = GOOGLE_ISSUER,
        token_lifetime_s: int = 3600,
        certs_max_age_s: int = 300,
        project_id: str = "local-project",
    ) -> None:
        self.issuer = issuer
        self.token_lifetime_s = token_lifetime_s
        self.certs_max_age_s = certs_max_age_s
        self.project_id = project_id
        self.scopes = ["https://www.googleapis.com/auth/cloud-platform"]
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = [SigningKey.generate()]  # the last one signs
        self._accounts: dict[str, _Listener] = {}
        self._identity_hits: Counter[tuple[str, str]] = Counter()
        self._certs_hits: list[int] = []  # when each certs request came (time.time_ns)
        self._certs = _Listener(_CertsHandler, self)
        self._started = False

    # Lifecycle -----------------------------------------------------------------------------------
    def start(self) -> IdentityEmulator:
        self._certs.start()
        for listener in list(self._accounts.values()):
            listener.start()
        self._started = True
        return self

    def stop(self) -> None:
        self._started = False
        self._certs.stop()
        for listener in list(self._accounts.values()):
            listener.stop()

    def __enter__(self) -> IdentityEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Accounts and addresses ----------------------------------------------------------------------
    def add_account(self, email: str) -> str:
        """Gives `email` its own metadata server (if it has none yet); returns its host:port."""
        with self._lock:
            listener = self._accounts.get(email)
            if listener is None:
                listener = _Listener(_MetadataHandler, self, email)
                self._accounts[email] = listener
        if self._started and not listener.running:
            listener.start()
        return f"127.0.0.1:{listener.port}"

    def metadata_host(self, email: str) -> str:
        listener = self._accounts.get(email)
        if listener is None or not listener.running:
            raise KeyError(f"no running metadata server for {email}; call add_account() after start()")
        return f"127.0.0.1:{listener.port}"

    def env_for(self, email: str) -> dict[str, str]:
        """Environment that points google-auth at this account's metadata server, with its secret: a secret
        itself, to be given only to the processes that act as `email` (never on a command line)."""
        host = f"{_SECRET_USER}:{self._secret_of(email)}@{self.add_account(email)}"
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}

    def authorization(self, email: str) -> str:
        """The Authorization header value that google-auth's requests send to `email`'s metadata server."""
        return basic_authorization(self._secret_of(email))

    def _secret_of(self, email: str) -> str:
        self.add_account(email)
        return self._accounts[email].secret

    @property
    def certs_url(self) -> str:
        return f"http://127.0.0.1:{self._certs.port}/oauth2/v1/certs"

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self._certs.port}/oauth2/v3/certs"

    # Certs endpoint control (to test "certs unreachable, then back") ------------------------------
    def stop_certs(self) -> None:
        self._certs.stop()

    def start_certs(self) -> None:
        """Restarts the certs listener on the port it had, so verifiers configured with it recover."""
        self._certs.start()

    # Keys ----------------------------------------------------------------------------------------
    @property
    def signing_key(self) -> SigningKey:
        with self._lock:
            return self._keys[-1]

    def rotate_key(self, *, keep_previous: bool = True) -> SigningKey:
        """A new key signs from now on; the old one stays published unless keep_previous is False."""
        key = SigningKey.generate()
        with self._lock:
            self._keys = ([*self._keys[-1:]] if keep_previous else []) + [key]
        return key

    def _published_pems(self) -> dict[str, str]:
        with self._lock:
            return {k.kid: k.cert_pem for k in self._keys}

    def _published_jwks(self) -> list[dict[str, str]]:
        with self._lock:
            return [k.jwk() for k in self._keys]

    # Tokens --------------------------------------------------------------------------------------
    def claims_for(self, email: str, audience: str, *, full: bool = True) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "azp": _subject(email),
            "sub": _subject(email),
            "iat": now,
            "exp": now + self.token_lifetime_s,
        }
        if full:
            claims["email"] = email
            claims["email_verified"] = True
        return claims

    def mint(
        self,
        email: str,
        audience: str,
        /,
        *,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
        **claim_overrides: Any,
    ) -> str:
        """A token as the metadata server would give, with overrides for forging bad ones in tests.

        Claim overrides (any claim, `email` and `aud` included) replace the defaults; None removes one; `header` entries override the JWT header (e.g.
        {"alg": "none"}, {"kid": "unknown"}); `key` signs with a key that is not published.
        """
        signer = key or self.signing_key
        claims = self.claims_for(email, audience)
        for name, value in claim_overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        jwt_header: dict[str, Any] = {"alg": "RS256", "kid": signer.kid, "typ": "JWT"}
        jwt_header.update(header or {})
        return encode_jwt(jwt_header, claims, signer)

    def _issue(self, email: str, audience: str, *, full: bool) -> str:
        with self._lock:
            self._identity_hits[(email, audience)] += 1
        key = self.signing_key
        return encode_jwt(
            {"alg": "RS256", "kid": key.kid, "typ": "JWT"}, self.claims_for(email, audience, full=full), key
        )

    # Counters for tests --------------------------------------------------------------------------
    def identity_requests(self, email: str | None = None, audience: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (e, a), n in self._identity_hits.items()
                if (email is None or e == email) and (audience is None or a == audience)
            )

    @property
    def certs_requests(self) -> int:
        with self._lock:
            return len(self._certs_hits)

    def certs_requested_at(self) -> list[int]:
        """When each certs request came, in time.time_ns: a test can tell which verification fetched them."""
        with self._lock:
            return list(self._certs_hits)

    def _count_certs(self) -> None:
        with self._lock:
            self._certs_hits.append(time.time_ns())

    def describe(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "certs_url": self.certs_url,
            "jwks_url": self.jwks_url,
            "accounts": {email: self.env_for(email) for email in self._accounts},
        }


def basic_authorization(secret: str) -> str:
    """What requests sends for a URL whose user information is `metadata:SECRET`."""
    return "Basic " + base64.b64encode(f"{_SECRET_USER}:{secret}".encode()).decode("ascii")


def _subject(email: str) -> str:
    # A stable numeric id per account, as Google's `sub` is.
    return str(int.from_bytes(hashlib.sha256(email.encode()).digest()[:8], "big"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.identity", description=__doc__.splitlines()[0])
    parser.add_argument("--account", action="append", default=[], help="service account email (repeatable)")
    parser.add_argument("--issuer", default=GOOGLE_ISSUER)
    parser.add_argument("--token-lifetime", type=int, default=3600, help="seconds")
    parser.add_argument("--certs-max-age", type=int, default=300, help="seconds")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    emulator = IdentityEmulator(
        issuer=args.issuer, token_lifetime_s=args.token_lifetime, certs_max_age_s=args.certs_max_age
    )
    with emulator:
        for email in args.account:
            emulator.add_account(email)
        print(json.dumps(emulator.describe()), flush=True)
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
