"""Settings read once from environment variables at start-up into typed objects.

A wrong value raises ConfigError with one line that names the variable and the fix; mesh.serving.main prints
that line on stderr and exits with status 2, so a misconfigured revision fails fast instead of half-serving.
Names follow the ecosystem where one exists: PORT and K_SERVICE (Cloud Run), OTEL_* (OpenTelemetry, read by
mesh.tracing), GOOGLE_APPLICATION_CREDENTIALS (google-auth, read by google-auth itself), GRPC_PING_* (the
grpc-ping sample).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

Env = Mapping[str, str]

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
# Set by mesh.workers in the environment of each worker it starts: its number (0-based).
WORKER_INDEX_VARIABLE = "MESH_WORKER_INDEX"
# BIND_HOST's default: every interface (IPv6 and, through it, IPv4), as a container on Cloud Run must listen.
ALL_INTERFACES = "::"
# The most of Cloud Run's 10 s between SIGTERM and SIGKILL that the lame duck and the grace may take together.
SHUTDOWN_SECONDS = 9.5
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting is wrong; the message is one line: variable, value, fix."""


def text(env: Env, name: str, default: str | None = None) -> str | None:
    value = env.get(name, "").strip()
    return value or default


def names(env: Env, name: str, default: str) -> list[str]:
    """A comma-separated list (e.g. OTEL_PROPAGATORS), blanks dropped."""
    return [item.strip() for item in (text(env, name, default) or default).split(",") if item.strip()]


def integer(env: Env, name: str, default: int, *, low: int, high: int) -> int:
    return _bounded(env, name, default, int, low, high, "an integer")


def seconds(env: Env, name: str, default: float, *, low: float = 0.0, high: float = 3600.0) -> float:
    return _bounded(env, name, default, float, low, high, "a number of seconds")


Number = TypeVar("Number", int, float)


def _bounded(
    env: Env, name: str, default: Number, parse: Callable[[str], Number], low: Number, high: Number, what: str
) -> Number:
    raw = text(env, name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is not valid; set {name} to {what} from {low:g} to {high:g}")
    return value


def flag(env: Env, name: str) -> bool:
    raw = text(env, name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not valid; set {name} to true or false (or leave it unset)")


def existing_file(env: Env, name: str) -> Path | None:
    raw = text(env, name)
    if raw is None:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}={raw!r}: no such file; set {name} to the path of a readable file")
    return path


def address(env: Env, name: str, default: str | None = None) -> str | None:
    """A `host:port` (IPv6 as `[::1]:443`) for an outgoing connection."""
    raw = text(env, name, default)
    if raw is None:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{name}={raw!r} is not valid; set {name} to host:port, e.g. ping-abc-uc.a.run.app:443"
        )
    return raw


def emails(env: Env, name: str) -> frozenset[str] | None:
    raw = text(env, name)
    if raw is None:
        return None
    items = frozenset(item.strip() for item in raw.split(",") if item.strip())
    bad = sorted(item for item in items if "@" not in item)
    if bad or not items:
        problem = f"{bad[0]!r} is not an email" if bad else "no email is listed"
        raise ConfigError(f"{name}: {problem}; set {name} to comma-separated emails")
    return items


def pem_file(env: Env, name: str, marker: str) -> Path | None:
    """An existing file holding a PEM block `marker` (e.g. "CERTIFICATE"); gRPC's own error would only say
    that the port could not be bound."""
    path = existing_file(env, name)
    if path is not None and f"{marker}-----" not in path.read_text(errors="replace"):
        raise ConfigError(
            f"{name}={str(path)!r} holds no PEM {marker}; set {name} to a PEM {marker.lower()} file"
        )
    return path


def ip_literal(env: Env, name: str, default: str) -> str:
    """An IP address to listen on, IPv6 with or without brackets (`::1`, `[::1]`); returned without them."""
    raw = text(env, name, default) or default
    try:
        return str(ipaddress.ip_address(raw.removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not valid; set {name} to an IP address, e.g. 127.0.0.1 or ::1 (this machine "
            "only) or :: (every interface)"
        ) from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Env, name: str = "LOG_LEVEL") -> str:
    raw = text(env, name, "INFO") or "INFO"
    if raw.upper() not in LOG_LEVELS:
        raise ConfigError(f"{name}={raw!r} is not valid; set {name} to one of {', '.join(LOG_LEVELS)}")
    return raw.upper()


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def target_host(target: str) -> str:
    """The host of a gRPC target (`host:port`, `[v6]:port`, a bare host or `dns:///host:port`); IPv6 in
    brackets. ValueError if it names none."""
    host = target.strip()
    if "://" in host:
        host = host.split("://", 1)[1].lstrip("/")  # dns:///host:port names no authority
    host = host.split("/", 1)[0]
    if host.startswith("["):  # [v6]:port
        host = host[: host.index("]") + 1] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    elif host.count(":") > 1:  # a bare IPv6 address has no port
        try:
            host = f"[{ipaddress.ip_address(host)}]"
        except ValueError:
            host = ""
    if not host or host == "[]":
        raise ValueError(f"target {target!r} names no host")
    return host


def https_url(env: Env, name: str, default: str) -> str:
    """An https URL; plain http only to a loopback host (a local emulator), where no one can read the wire."""
    value = text(env, name, default) or default
    parts = urlsplit(value)
    try:
        host = parts.hostname
    except ValueError:
        host = None
    if host and (parts.scheme == "https" or (parts.scheme == "http" and host in LOOPBACK_HOSTS)):
        return value
    raise ConfigError(
        f"{name}={value!r} is not valid; set {name} to an https:// URL (http:// only for localhost, "
        "127.0.0.1 or [::1])"
    )


@dataclass(frozen=True)
class ServerSettings:
    """How the process serves: address, optional TLS, shutdown grace and load bounds."""

    service: str
    port: int = 8080
    # The address the server listens on. Every interface by default, as a container on Cloud Run must (the
    # front end reaches it from outside); the local mesh and the test stacks set loopback, so a developer's
    # services (token-less health and reflection among them) are not reachable from the network. BIND_HOST, not
    # HOST: csh and tcsh export HOST as the machine's name.
    bind_host: str = ALL_INTERFACES
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # After SIGTERM: NOT_SERVING while still serving for `lame_duck_seconds` (health-checking front ends move
    # away), then in-flight calls get `grace_seconds` (mesh.server._drain). Cloud Run sends SIGKILL 10 s after SIGTERM:
    # both together stay within SHUTDOWN_SECONDS, leaving time to flush spans and metrics.
    lame_duck_seconds: float = 1.5
    grace_seconds: float = 7.0
    max_concurrent_rpcs: int = 1000
    # The threads model's pool: calls in progress at once (a stream holds its thread while open); more wait.
    server_threads: int = 256
    # A worker of a multi-process instance (mesh.workers) shares the port with its siblings.
    share_port: bool = False

    @classmethod
    def from_env(cls, env: Env, default_service: str) -> ServerSettings:
        cert, key = pem_file(env, "TLS_CERT_FILE", "CERTIFICATE"), pem_file(
            env, "TLS_KEY_FILE", "PRIVATE KEY"
        )
        if (cert is None) != (key is None):
            missing = "TLS_KEY_FILE" if key is None else "TLS_CERT_FILE"
            raise ConfigError(
                f"{missing} is not set; set both TLS_CERT_FILE and TLS_KEY_FILE, or neither for h2c"
            )
        lame_duck = seconds(env, "SHUTDOWN_LAME_DUCK_SECONDS", 1.5, high=SHUTDOWN_SECONDS)
        grace = seconds(env, "SHUTDOWN_GRACE_SECONDS", 7.0, high=SHUTDOWN_SECONDS)
        if lame_duck + grace > SHUTDOWN_SECONDS:
            raise ConfigError(
                f"SHUTDOWN_LAME_DUCK_SECONDS={lame_duck:g} and SHUTDOWN_GRACE_SECONDS={grace:g} add up to "
                f"{lame_duck + grace:g} s, past Cloud Run's SIGKILL 10 s after SIGTERM; set them to add up to "
                f"{SHUTDOWN_SECONDS:g} at most"
            )
        return cls(
            service=text(env, "K_SERVICE", default_service) or default_service,
            port=integer(env, "PORT", 8080, low=0, high=65535),
            bind_host=ip_literal(env, "BIND_HOST", ALL_INTERFACES),
            tls_cert_file=cert,
            tls_key_file=key,
            lame_duck_seconds=lame_duck,
            grace_seconds=grace,
            max_concurrent_rpcs=integer(env, "MAX_CONCURRENT_RPCS", 1000, low=1, high=100_000),
            server_threads=integer(env, "SERVER_THREADS", 256, low=1, high=10_000),
            share_port=WORKER_INDEX_VARIABLE in env,
        )


@dataclass(frozen=True)
class AuthSettings:
    """Verification of incoming ID tokens; off unless AUTH_AUDIENCE is set, which on Cloud Run (K_SERVICE set)
    takes AUTH_IAM_ONLY=true: there a forgotten variable must stop the revision, not open the service.

    An audience wants an allow-list (AUTH_ALLOWED_CALLERS) everywhere: any Google account can mint an ID token
    for any audience, so an audience alone admits strangers. Off Cloud Run, where no IAM stands in front, only
    AUTH_ANY_CALLER=true lifts that (mesh.serving logs a warning at start); on Cloud Run, AUTH_IAM_ONLY=true.
    """

    audience: str | None = None
    certs_url: str = GOOGLE_CERTS_URL
    issuers: tuple[str, ...] = GOOGLE_ISSUERS
    allowed_callers: frozenset[str] | None = None
    iam_only: bool = False  # Cloud Run's IAM (roles/run.invoker) alone guards the service
    any_caller: bool = False  # off Cloud Run: every holder of a valid token for the audience is admitted

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        issuers = text(env, "AUTH_ISSUERS")
        audience = text(env, "AUTH_AUDIENCE")
        if audience is None and text(env, "AUTH_ALLOWED_CALLERS"):
            # Without an audience nothing is verified: an allow-list alone would give a false sense of safety.
            raise ConfigError(
                "AUTH_ALLOWED_CALLERS is set but AUTH_AUDIENCE is not; set AUTH_AUDIENCE to turn on token "
                "verification, or unset AUTH_ALLOWED_CALLERS"
            )
        settings = cls(
            audience=audience,
            certs_url=https_url(env, "AUTH_CERTS_URL", GOOGLE_CERTS_URL),
            issuers=tuple(i.strip() for i in issuers.split(",") if i.strip()) if issuers else GOOGLE_ISSUERS,
            allowed_callers=emails(env, "AUTH_ALLOWED_CALLERS"),
            iam_only=flag(env, "AUTH_IAM_ONLY"),
            any_caller=flag(env, "AUTH_ANY_CALLER"),
        )
        if settings.any_caller and settings.allowed_callers is not None:
            raise ConfigError(
                "AUTH_ANY_CALLER=true and AUTH_ALLOWED_CALLERS are both set; unset AUTH_ANY_CALLER to admit "
                "only the listed callers, or unset AUTH_ALLOWED_CALLERS"
            )
        on_cloud_run = text(env, "K_SERVICE")
        if on_cloud_run and not settings.iam_only:
            missing = "AUTH_AUDIENCE" if audience is None else None
            if missing is None and settings.allowed_callers is None:
                missing = "AUTH_ALLOWED_CALLERS"
            if missing:
                raise ConfigError(
                    f"{missing} is not set on Cloud Run (K_SERVICE={on_cloud_run}); set AUTH_AUDIENCE to the "
                    "service's URL and AUTH_ALLOWED_CALLERS to its callers' emails, or set AUTH_IAM_ONLY=true "
                    "if Cloud Run's IAM alone is meant to guard it"
                )
        elif not on_cloud_run and audience and settings.allowed_callers is None and not settings.any_caller:
            raise ConfigError(
                "AUTH_ALLOWED_CALLERS is not set but AUTH_AUDIENCE is, so any Google account could call; set "
                "AUTH_ALLOWED_CALLERS to the callers' emails, or AUTH_ANY_CALLER=true to admit every holder "
                "of a valid token for the audience"
            )
        return settings


CONNECT_TO_VARIABLE = "MESH_CONNECT_TO"


@dataclass(frozen=True)
class ConnectTo:
    """MESH_CONNECT_TO=SUFFIX=HOST:PORT, a local resolver for development: an upstream whose host is SUFFIX or
    ends with it (label by label: `.run.app` matches `ping-1.europe-west1.run.app`, not `evilrun.app`) is
    dialled at HOST:PORT, e.g. the local Cloud Run's front end, and keeps its own name as the TLS name, the
    `:authority` and the ID token's audience, as on Cloud Run. One entry: the local Cloud Run serves every
    `run.app` name on one port. HOST must be this machine: nothing in production sets it, and a redirect
    elsewhere would send the mesh's ID tokens to another host."""

    suffix: str | None = None  # without its leading dot
    address: str | None = None

    def dial(self, target: str) -> str | None:
        """Where to dial `target` instead, or None (dial it as it is)."""
        if self.suffix is None:
            return None
        host = target_host(target)
        return self.address if host == self.suffix or host.endswith("." + self.suffix) else None

    @classmethod
    def from_env(cls, env: Env) -> ConnectTo:
        name = CONNECT_TO_VARIABLE
        raw = text(env, name)
        if raw is None:
            return cls()
        suffix, sep, where = raw.partition("=")
        suffix = suffix.strip().removeprefix(".")
        host, colon, port = where.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        well_formed = (
            sep
            and suffix
            and not any(c in suffix for c in ",=:/[] ")
            and colon
            and port.isdigit()
            and 0 < int(port) < 65536
        )
        if not well_formed:
            raise ConfigError(
                f"{name}={raw!r} is not valid; set {name} to one SUFFIX=HOST:PORT with HOST on this machine, "
                f"e.g. .run.app=127.0.0.1:8443, or unset it"
            )
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"{name}={raw!r} sends .{suffix} to {host}, not this machine; it is for local development: set "
                f"its HOST to 127.0.0.1, [::1] or localhost, or unset {name}"
            )
        return cls(suffix=suffix, address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@dataclass(frozen=True)
class Upstream:
    """Where an outgoing channel goes and how: TLS (system roots or TLS_CA_FILE) and an ID token by default."""

    address: str
    insecure: bool = False
    unauthenticated: bool = False
    audience: str | None = None  # default: https://HOST
    ca_file: Path | None = None
    authority: str | None = None
    # Dialled instead of `address` (MESH_CONNECT_TO), which still names the upstream: its TLS name and
    # :authority (unless `authority` says otherwise) and its default audience.
    dial: str | None = None

    def connected(self, connect_to: ConnectTo) -> Upstream:
        """This upstream as `connect_to` says to dial it."""
        return replace(self, dial=connect_to.dial(self.address))

    @classmethod
    def from_env(
        cls, env: Env, address_var: str, *, insecure_var: str, unauthenticated_var: str
    ) -> Upstream | None:
        where = address(env, address_var)
        if where is None:
            return None
        return cls(
            address=where,
            insecure=flag(env, insecure_var),
            unauthenticated=flag(env, unauthenticated_var),
            audience=text(env, f"{address_var}_AUDIENCE"),
            ca_file=existing_file(env, "TLS_CA_FILE"),
        ).connected(ConnectTo.from_env(env))


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive on the mesh's connections, both ways: a caller pings every `time` seconds and drops a
    connection whose ping is not answered within `timeout` (a frozen or black-holed peer is noticed within
    time + timeout); a server accepts pings at least twice as often as that, so its own callers are never told
    GOAWAY "too_many_pings". The 30 s default is the interval Google's own client libraries use towards
    Google's front end (which Cloud Run callers reach), a front end that answers faster pings with GOAWAY."""

    time: float = 30.0
    timeout: float = 10.0

    @property
    def detection_bound(self) -> float:
        """The longest a frozen peer goes unnoticed on an established connection."""
        return self.time + self.timeout

    @classmethod
    def from_env(cls, env: Env) -> Keepalive:
        return cls(
            time=seconds(env, "KEEPALIVE_TIME_SECONDS", 30.0, low=0.5),
            timeout=seconds(env, "KEEPALIVE_TIMEOUT_SECONDS", 10.0, low=0.5, high=600.0),
        )


@dataclass(frozen=True)
class CallSettings:
    """Defaults for outgoing calls."""

    # Deadline for a downstream call when the incoming call has none (or there is no incoming call).
    default_timeout: float = 30.0
    # Time kept back from the incoming deadline for answering with what the downstream calls gave (a partial
    # Survey, a relay's status naming its upstream); never more than half of what is left.
    margin: float = 0.25
    # A connection attempt (TCP, TLS, the peer's HTTP/2 SETTINGS) that takes longer fails; the channel then
    # fails calls fast (TRANSIENT_FAILURE) until a later attempt succeeds.
    connect_timeout: float = 5.0
    keepalive: Keepalive = Keepalive()

    @classmethod
    def from_env(cls, env: Env) -> CallSettings:
        return cls(
            default_timeout=seconds(env, "DOWNSTREAM_TIMEOUT_SECONDS", 30.0, low=0.001),
            margin=seconds(env, "DOWNSTREAM_DEADLINE_MARGIN_SECONDS", 0.25, high=60.0),
            connect_timeout=seconds(env, "DOWNSTREAM_CONNECT_TIMEOUT_SECONDS", 5.0, low=0.1, high=120.0),
            keepalive=Keepalive.from_env(env),
        )
