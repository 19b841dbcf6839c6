"""The CLI's arguments, exit statuses and connection flags (TLS, custom CA, authority, ID tokens)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from emulators.dev_ca import DevCerts, ensure_dev_certs
from emulators.identity import IdentityEmulator
from mesh.testing import running
from services.cli import connection
from services.cli.main import build_parser, main
from services.cli.testing import cli
from services.ping.main import build

ALICE = "alice@proj.iam.gserviceaccount.com"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "the following arguments are required: --server"),
        (["--server", "no-port", "ping", "send", "--message", "x"], "'no-port' is not host:port"),
        (["--server", "h:1", "ping", "send"], "the following arguments are required: --message"),
        (["--server", "h:1", "nowhere"], "invalid choice: 'nowhere'"),
        (["--server", "h:1", "routeguide", "get", "40.9", "-74.6"], "'40.9' is not an integer coordinate"),
        (["--server", "h:1", "routeguide", "get", "3000000000", "0"], "'3000000000' does not fit"),
        (["--server", "h:1", "routeguide", "record", "1;2"], "'1;2' is not LAT,LON"),
        (["--server", "h:1", "routeguide", "chat", "1,2"], "'1,2' is not LAT,LON:message"),
        (
            ["--server", "h:1", "aggregator", "survey", "--message", "m", "--area", "1,2,3"],
            "'1,2,3' is not LO_LAT,LO_LON,HI_LAT,HI_LON",
        ),
        (
            ["--server", "h:1", "--timeout", "0", "ping", "send", "--message", "x"],
            "'0' is not a number of seconds",
        ),
        (["--server", "h:1", "--ca", "/no/such/ca.pem", "ping", "send", "--message", "x"], "no such file"),
    ],
)
def test_a_bad_argument_exits_2_with_the_reason(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: cli") and complaint in err


def test_a_connect_to_off_this_machine_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A redirect to another host would hand it the ID token minted for the run.app name.
    monkeypatch.setenv("MESH_CONNECT_TO", ".run.app=192.0.2.10:443")
    status = main(["--server", "ping-1.europe-west1.run.app:443", "ping", "send", "--message", "m"])
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "")
    (line,) = captured.err.splitlines()
    assert line.startswith("error: MESH_CONNECT_TO=") and "192.0.2.10" in line and "127.0.0.1" in line


def test_connect_to_dials_a_matching_server_at_loopback_and_keeps_its_name() -> None:
    args = build_parser().parse_args(
        ["--server", "ping-1.europe-west1.run.app:443", "ping", "send", "--message", "m"]
    )
    target = connection.upstream(args, {"MESH_CONNECT_TO": ".run.app=[::1]:8443"})
    assert (target.address, target.dial, target.authority, target.audience) == (
        "ping-1.europe-west1.run.app:443",
        "[::1]:8443",
        None,  # the channel names it by its address
        None,  # the channel factory's https://HOST of the address
    )
    assert connection.upstream(args, {}).dial is None


def test_southern_and_western_points_are_values_not_options() -> None:
    parse = build_parser().parse_args
    get = parse(["--server", "h:1", "routeguide", "get", "-338568000", "-1512153000"])
    assert (get.latitude, get.longitude) == (-338568000, -1512153000)
    record = parse(["--server", "h:1", "routeguide", "record", "-338568000,1512153000", "-1,-2"])
    assert [(p.latitude, p.longitude) for p in record.points] == [(-338568000, 1512153000), (-1, -2)]
    chat = parse(["--server", "h:1", "routeguide", "chat", "-1,2:hi: there"])
    assert (chat.notes[0].location.latitude, chat.notes[0].message) == (-1, "hi: there")
    survey = parse(["--server", "h:1", "aggregator", "survey", "--message", "m", "--area", "-3,-4,1,2"])
    assert (survey.area.lo.latitude, survey.area.hi.longitude, survey.route) == (-3, 2, [])


def test_server_host_names_the_authority_and_the_default_audience() -> None:
    parse = build_parser().parse_args
    args = parse(
        ["--server", "127.0.0.1:8443", "--server-host", "ping-x.a.run.app", "ping", "send", "--message", "m"]
    )
    target = connection.upstream(args)
    assert (target.authority, target.audience, target.insecure, target.unauthenticated) == (
        "ping-x.a.run.app",
        "https://ping-x.a.run.app",
        False,
        False,
    )
    args = parse(
        [
            "--server",
            "h:1",
            "--server-host",
            "n",
            "--audience",
            "https://aud",
            "ping",
            "send",
            "--message",
            "m",
        ]
    )
    assert connection.upstream(args).audience == "https://aud"
    args = parse(["--server", "h:1", "ping", "send", "--message", "m"])
    assert connection.upstream(args).audience is None  # the channel factory's https://HOST


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as emu:
        yield emu


def tls_env(certs: DevCerts, emulator: IdentityEmulator, audience: str) -> dict[str, str]:
    return {
        "TLS_CERT_FILE": str(certs.server_cert),
        "TLS_KEY_FILE": str(certs.server_key),
        "AUTH_AUDIENCE": audience,
        "AUTH_CERTS_URL": emulator.certs_url,
        "AUTH_ALLOWED_CALLERS": ALICE,
    }


def run_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as its own process: google-auth reads GCE_METADATA_HOST when it is imported."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "GOOGLE_APPLICATION"))
    }
    full_env.update(env, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    command = [sys.executable, "-m", "services.cli.main", *argv]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=90, check=False)


async def test_tls_with_an_id_token_for_the_server_host(certs: DevCerts, emulator: IdentityEmulator) -> None:
    async with running("ping", build, tls_env(certs, emulator, "https://localhost")) as server:
        flags = [
            "--server",
            f"127.0.0.1:{server.port}",
            "--ca",
            str(certs.ca_cert),
            "--server-host",
            "localhost",
        ]
        done = await asyncio.to_thread(
            run_cli, emulator.env_for(ALICE), *flags, "--json", "ping", "send", "--message", "signed"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["pong"]["message"] == "signed"
        assert emulator.identity_requests(ALICE, "https://localhost") == 1
        # A token for another audience is refused by the server: exit 1 with its status.
        wrong = await asyncio.to_thread(
            run_cli,
            emulator.env_for(ALICE),
            *flags,
            "--audience",
            "https://else",
            "ping",
            "send",
            "--message",
            "m",
        )
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.startswith("error: UNAUTHENTICATED: ")
    assert emulator.identity_requests(ALICE, "https://else") == 1


async def test_tls_unauthenticated_is_refused_by_a_verifying_server(
    capsys: pytest.CaptureFixture[str], certs: DevCerts, emulator: IdentityEmulator
) -> None:
    async with running("ping", build, tls_env(certs, emulator, "https://localhost")) as server:
        ca = ("--ca", str(certs.ca_cert))
        done = await cli(
            capsys, server.port, *ca, "--unauthenticated", "ping", "send", "--message", "m", plaintext=False
        )
    assert (done.status, done.out) == (1, "")
    assert done.err.startswith("error: UNAUTHENTICATED: ")


async def test_tls_unauthenticated_to_an_open_server(
    capsys: pytest.CaptureFixture[str], certs: DevCerts
) -> None:
    env = {"TLS_CERT_FILE": str(certs.server_cert), "TLS_KEY_FILE": str(certs.server_key)}
    async with running("ping", build, env) as server:
        ca = ("--ca", str(certs.ca_cert), "--unauthenticated")
        done = await cli(capsys, server.port, *ca, "ping", "send", "--message", "over tls", plaintext=False)
        # Without the custom CA the server's certificate is not trusted.
        untrusted = await cli(
            capsys,
            server.port,
            "--unauthenticated",
            "--timeout",
            "5",
            "ping",
            "send",
            "--message",
            "m",
            plaintext=False,
        )
    assert done.status == 0 and done.lines[0].startswith("pong 1: 'over tls'")
    assert untrusted.status == 1 and untrusted.err.startswith("error: UNAVAILABLE: ")
