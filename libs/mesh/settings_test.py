"""Settings: defaults, and every wrong value is a one-line ConfigError naming its variable; a real process
started with a wrong value exits 2 with that one line on stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulators.dev_ca import ensure_dev_certs
from mesh.settings import (
    AuthSettings,
    CallSettings,
    ConfigError,
    ServerSettings,
    Upstream,
    log_level,
)
from mesh.testing import running
from services.ping.main import build as build_ping


def server(env: dict[str, str]) -> Any:
    return ServerSettings.from_env(env, "ping")


def auth(env: dict[str, str]) -> Any:
    return AuthSettings.from_env(env)


def calls(env: dict[str, str]) -> Any:
    return CallSettings.from_env(env)


def upstream(env: dict[str, str]) -> Any:
    return Upstream.from_env(
        env,
        "GRPC_PING_HOST",
        insecure_var="GRPC_PING_INSECURE",
        unauthenticated_var="GRPC_PING_UNAUTHENTICATED",
    )


def test_defaults() -> None:
    settings = server({})
    assert (settings.service, settings.port, settings.tls_cert_file, settings.tls_key_file) == (
        "ping",
        8080,
        None,
        None,
    )
    # Cloud Run kills the instance 10 s after SIGTERM: the lame duck, the grace and the flush must fit.
    assert settings.lame_duck_seconds > 0 and settings.lame_duck_seconds + settings.grace_seconds < 10
    assert auth({}).audience is None
    assert calls({}).default_timeout == 30.0
    assert upstream({}) is None
    assert log_level({}) == "INFO"


def test_values_are_read() -> None:
    settings = server(
        {
            "PORT": "9090",
            "K_SERVICE": "ping-eu",
            "SHUTDOWN_GRACE_SECONDS": "2.5",
            "SHUTDOWN_LAME_DUCK_SECONDS": "0",
        }
    )
    assert (settings.service, settings.port, settings.grace_seconds) == ("ping-eu", 9090, 2.5)
    assert settings.lame_duck_seconds == 0
    verified = auth({"AUTH_AUDIENCE": "https://ping", "AUTH_ALLOWED_CALLERS": "a@x.com, b@x.com"})
    assert verified.allowed_callers == {"a@x.com", "b@x.com"}
    assert calls({"DOWNSTREAM_TIMEOUT_SECONDS": "1.5"}).default_timeout == 1.5
    tuned = calls(
        {
            "DOWNSTREAM_DEADLINE_MARGIN_SECONDS": "0.1",
            "DOWNSTREAM_CONNECT_TIMEOUT_SECONDS": "2",
            "KEEPALIVE_TIME_SECONDS": "1",
            "KEEPALIVE_TIMEOUT_SECONDS": "0.5",
        }
    )
    assert (tuned.margin, tuned.connect_timeout, tuned.keepalive.detection_bound) == (0.1, 2.0, 1.5)
    up = upstream({"GRPC_PING_HOST": "ping-up.a.run.app:443", "GRPC_PING_INSECURE": "true"})
    assert (up.address, up.insecure, up.unauthenticated) == ("ping-up.a.run.app:443", True, False)
    assert log_level({"LOG_LEVEL": "debug"}) == "DEBUG"


@pytest.mark.parametrize(
    "given, bound",
    [(None, "::"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1"), (" 0.0.0.0 ", "0.0.0.0")],
)
def test_the_server_listens_on_every_interface_unless_bind_host_says(given: str | None, bound: str) -> None:
    # Every interface by default: on Cloud Run the front end reaches the container from outside it.
    assert server({} if given is None else {"BIND_HOST": given}).bind_host == bound


@pytest.mark.parametrize(
    "certs_url",
    [
        "https://www.googleapis.com/oauth2/v3/certs",
        "http://127.0.0.1:8123/certs",
        "http://[::1]:80/c",
        "http://localhost/c",
    ],
)
def test_certs_come_over_https_or_from_loopback(certs_url: str) -> None:
    env = {"AUTH_AUDIENCE": "https://ping", "AUTH_ALLOWED_CALLERS": "a@x.com", "AUTH_CERTS_URL": certs_url}
    assert auth(env).certs_url == certs_url


def test_on_cloud_run_iam_alone_is_an_explicit_choice() -> None:
    assert auth({"K_SERVICE": "ping", "AUTH_IAM_ONLY": "true"}).audience is None
    verified = auth({"K_SERVICE": "ping", "AUTH_AUDIENCE": "https://ping", "AUTH_ALLOWED_CALLERS": "a@x.com"})
    assert verified.allowed_callers == {"a@x.com"} and not verified.iam_only
    assert auth({}).audience is None  # off Cloud Run, no verification is still the default


def test_off_cloud_run_any_caller_is_an_explicit_choice() -> None:
    # Any Google account can mint a token for any audience: an audience alone would admit strangers.
    with pytest.raises(ConfigError, match=r"^AUTH_ALLOWED_CALLERS is not set but AUTH_AUDIENCE is"):
        auth({"AUTH_AUDIENCE": "https://ping"})
    anyone = auth({"AUTH_AUDIENCE": "https://ping", "AUTH_ANY_CALLER": "true"})
    assert anyone.any_caller and anyone.allowed_callers is None
    listed = auth({"AUTH_AUDIENCE": "https://ping", "AUTH_ALLOWED_CALLERS": "a@x.com"})
    assert not listed.any_caller and listed.allowed_callers == {"a@x.com"}


async def test_any_caller_is_one_warning_line_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    env = {"AUTH_AUDIENCE": "https://ping.example", "AUTH_ANY_CALLER": "true"}
    async with running("ping", build_ping, env):
        pass
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith(
        "AUTH_ANY_CALLER=true: every holder of a valid ID token for https://ping.example"
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    certs = ensure_dev_certs(tmp_path / "certs")
    (tmp_path / "not-pem.txt").write_text("hello\n")
    return {
        "cert": str(certs.server_cert),
        "key": str(certs.server_key),
        "junk": str(tmp_path / "not-pem.txt"),
    }


def wrong(
    read: Callable[[dict[str, str]], Any], *cases: str
) -> list[tuple[Callable[[dict[str, str]], Any], dict[str, str], str]]:
    """Each case read by `read`: "VAR=value&OTHER=value" (the environment), whose error names its last
    variable, or the one after " -> "."""
    made = []
    for case in cases:
        assignments, _, named = case.partition(" -> ")
        env = dict(pair.split("=", 1) for pair in assignments.split("&"))
        made.append((read, env, named or list(env)[-1]))
    return made


WRONG: list[tuple[Callable[[dict[str, str]], Any], dict[str, str], str]] = [
    *wrong(
        server,
        "PORT=http",
        "PORT=70000",
        "PORT=-1",
        "SHUTDOWN_GRACE_SECONDS=30",
        "SHUTDOWN_GRACE_SECONDS=soon",
        "SHUTDOWN_LAME_DUCK_SECONDS=-1",
        # Each within bounds, but together past Cloud Run's SIGKILL.
        "SHUTDOWN_GRACE_SECONDS=8&SHUTDOWN_LAME_DUCK_SECONDS=2",
        "MAX_CONCURRENT_RPCS=0",
        "SERVER_THREADS=none",
        "TLS_CERT_FILE=/no/such/cert.pem&TLS_KEY_FILE=/no/such/key.pem -> TLS_CERT_FILE",
        # An address to listen on, not a name: a host name could resolve to an interface of the network.
        "BIND_HOST=localhost",
        "BIND_HOST=127.0.0.1:8080",
        "BIND_HOST=my-laptop",
    ),
    *wrong(
        auth,
        "AUTH_AUDIENCE=https://ping&AUTH_ALLOWED_CALLERS=alice",
        "AUTH_AUDIENCE=https://ping&AUTH_ALLOWED_CALLERS= , ",
        # An allow-list that nothing would enforce.
        "AUTH_ALLOWED_CALLERS=a@x.com -> AUTH_AUDIENCE",
        # Off Cloud Run an audience wants an allow-list, or AUTH_ANY_CALLER=true; no IAM there to stand in
        # for it.
        "AUTH_AUDIENCE=https://ping -> AUTH_ALLOWED_CALLERS",
        "AUTH_AUDIENCE=https://ping&AUTH_IAM_ONLY=true -> AUTH_ALLOWED_CALLERS",
        "AUTH_AUDIENCE=https://ping&AUTH_ANY_CALLER=false -> AUTH_ALLOWED_CALLERS",
        "AUTH_AUDIENCE=https://ping&AUTH_ANY_CALLER=everyone",
        "AUTH_AUDIENCE=https://p&AUTH_ALLOWED_CALLERS=a@x.com&AUTH_ANY_CALLER=1",
        "AUTH_AUDIENCE=https://ping&AUTH_CERTS_URL=ftp://certs",
        # Keys over plain http could be swapped by anyone on the path: http only to a loopback emulator.
        "AUTH_AUDIENCE=https://ping&AUTH_CERTS_URL=http://certs.example/v1",
        "AUTH_AUDIENCE=https://ping&AUTH_CERTS_URL=http://127.0.0.1.nip.io/",
        "AUTH_AUDIENCE=https://ping&AUTH_CERTS_URL=https:///certs",
        # On Cloud Run (K_SERVICE set) a missing verification setting stops start-up, unless AUTH_IAM_ONLY
        # says so.
        "K_SERVICE=ping -> AUTH_AUDIENCE",
        "K_SERVICE=ping&AUTH_IAM_ONLY=false -> AUTH_AUDIENCE",
        "K_SERVICE=ping&AUTH_AUDIENCE=https://ping -> AUTH_ALLOWED_CALLERS",
        "K_SERVICE=ping&AUTH_IAM_ONLY=sure",
    ),
    *wrong(
        calls,
        "DOWNSTREAM_TIMEOUT_SECONDS=0",
        "DOWNSTREAM_TIMEOUT_SECONDS=5m",
        "DOWNSTREAM_TIMEOUT_SECONDS=7200",
        "DOWNSTREAM_DEADLINE_MARGIN_SECONDS=-1",
        "DOWNSTREAM_CONNECT_TIMEOUT_SECONDS=0",
        "KEEPALIVE_TIME_SECONDS=0.1",
        "KEEPALIVE_TIMEOUT_SECONDS=soon",
    ),
    *wrong(
        upstream,
        "GRPC_PING_HOST=ping.a.run.app",
        "GRPC_PING_HOST=ping.a.run.app:https",
        "GRPC_PING_HOST=ping:443&GRPC_PING_INSECURE=maybe",
        "GRPC_PING_HOST=ping:443&GRPC_PING_UNAUTHENTICATED=2",
        "GRPC_PING_HOST=ping:443&TLS_CA_FILE=/no/such/ca.pem",
    ),
    # A local resolver: SUFFIX=HOST:PORT, one entry, HOST on this machine (it receives the mesh's ID tokens).
    *[
        (upstream, {"GRPC_PING_HOST": "p-1.r.run.app:443", "MESH_CONNECT_TO": value}, "MESH_CONNECT_TO")
        for value in (
            ".run.app",
            "127.0.0.1:8443",
            ".run.app=127.0.0.1",
            ".run.app=127.0.0.1:0",
            ".run.app=127.0.0.1:http",
            "=127.0.0.1:8443",
            ".=127.0.0.1:8443",
            ".run.app=127.0.0.1:8443,.example=127.0.0.1:9443",
            ".run.app=10.0.0.7:8443",
            ".run.app=front.example:443",
            ".run.app=[::2]:8443",
            ".run.app=0.0.0.0:8443",
        )
    ],
    *wrong(
        log_level,
        "LOG_LEVEL=loud",
    ),
]


@pytest.mark.parametrize(
    "address, connect_to, dialled",
    [
        ("ping-1.europe-west1.run.app:443", ".run.app=127.0.0.1:8443", "127.0.0.1:8443"),
        ("tag---ping-1.europe-west1.run.app:443", "run.app=[::1]:8443", "[::1]:8443"),
        ("ping-1.europe-west1.run.app:443", ".europe-west1.run.app=localhost:9", "localhost:9"),
        ("run.app:443", ".run.app=127.0.0.1:8443", "127.0.0.1:8443"),
        # By whole labels only, and never for other names.
        ("evilrun.app:443", ".run.app=127.0.0.1:8443", None),
        ("ping.example:443", ".run.app=127.0.0.1:8443", None),
        ("ping-1.europe-west1.run.app:443", None, None),
    ],
)
def test_connect_to_dials_matching_upstreams_on_this_machine_and_keeps_their_name(
    address: str, connect_to: str | None, dialled: str | None
) -> None:
    env = {"GRPC_PING_HOST": address, **({"MESH_CONNECT_TO": connect_to} if connect_to else {})}
    up = upstream(env)
    assert (up.address, up.dial, up.authority, up.audience) == (address, dialled, None, None)


@pytest.mark.parametrize(
    "read, env, variable", WRONG, ids=[f"{v}={list(e.values())[-1]}" for _, e, v in WRONG]
)
def test_a_wrong_value_names_its_variable_in_one_line(
    read: Callable[[dict[str, str]], Any], env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as err:
        read(env)
    message = str(err.value)
    assert variable in message
    assert "\n" not in message
    assert "set " in message  # says how to fix it


@pytest.mark.parametrize(
    "given, variable",
    [
        ({"cert": "cert"}, "TLS_KEY_FILE"),  # a certificate without its key
        ({"key": "key"}, "TLS_CERT_FILE"),
        ({"cert": "junk", "key": "key"}, "TLS_CERT_FILE"),  # not PEM: gRPC would only say "failed to bind"
        ({"cert": "cert", "key": "junk"}, "TLS_KEY_FILE"),
        ({"cert": "key", "key": "key"}, "TLS_CERT_FILE"),  # the key where the certificate belongs
    ],
)
def test_tls_files_must_come_in_a_usable_pair(
    tls_files: dict[str, str], given: dict[str, str], variable: str
) -> None:
    env = {f"TLS_{kind.upper()}_FILE": tls_files[name] for kind, name in given.items()}
    with pytest.raises(ConfigError, match=variable):
        server(env)


def test_tls_pair_is_read(tls_files: dict[str, str]) -> None:
    settings = server({"TLS_CERT_FILE": tls_files["cert"], "TLS_KEY_FILE": tls_files["key"]})
    assert (str(settings.tls_cert_file), str(settings.tls_key_file)) == (tls_files["cert"], tls_files["key"])


# One per place main() reads settings: before the event loop (logging), in it (tracing), in serve() (the rest).
# And an audience with no allow-list, which the line names as what is missing.
WRONG_IN_A_PROCESS = {
    "LOG_LEVEL": "chatty",
    "OTEL_TRACES_EXPORTER": "jaegr",
    "PORT": "eighty",
    "AUTH_AUDIENCE": "https://ping.example",
}


@pytest.fixture(scope="module")
def wrong_processes() -> dict[str, subprocess.CompletedProcess[str]]:
    """`python -m services.ping.main` once per wrong value, all started at once (each takes about a second)."""
    started = {}
    for variable, value in WRONG_IN_A_PROCESS.items():
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path), "PORT": "0"}
        started[variable] = subprocess.Popen(
            [sys.executable, "-m", "services.ping.main"],
            env={**env, variable: value},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finished = {}
    for variable, process in started.items():
        try:
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()  # no-op when it has exited; never leave one serving
        finished[variable] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return finished


@pytest.mark.parametrize("variable", WRONG_IN_A_PROCESS)
def test_a_process_with_a_wrong_value_exits_2_with_one_line_naming_it(
    wrong_processes: dict[str, subprocess.CompletedProcess[str]], variable: str
) -> None:
    done = wrong_processes[variable]
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0] and lines[0].startswith("config error: ")
    assert "serving" not in done.stdout  # it never started


def test_a_process_with_an_audience_alone_names_the_missing_allow_list(
    wrong_processes: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    (line,) = wrong_processes["AUTH_AUDIENCE"].stderr.splitlines()
    assert line.startswith("config error: AUTH_ALLOWED_CALLERS is not set") and "AUTH_ANY_CALLER=true" in line
