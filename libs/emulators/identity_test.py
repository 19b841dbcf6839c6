"""The identity emulator answers as google-auth expects, and its tokens verify with google-auth's verifier."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Iterator

import google.auth.transport.requests
import google.oauth2.id_token
import pytest

from emulators.identity import IdentityEmulator, basic_authorization

ALICE = "alice@proj.iam.gserviceaccount.com"
AUD = "https://svc.example"


@pytest.fixture
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator(certs_max_age_s=123) as emu:
        emu.add_account(ALICE)
        yield emu


# google-auth's own fetch_id_token_credentials path (ping, account info, identity), as a service runs it.
MINT = (
    "import google.auth.transport.requests as r, google.oauth2.id_token as t\n"
    "req = r.Request(); c = t.fetch_id_token_credentials(%r, request=req); c.refresh(req)\n"
    "print(type(c).__module__, c.service_account_email, c.token)\n" % AUD
)


def get(url: str, flavor: bool = True, authorization: str = "") -> tuple[int, dict[str, str], str]:
    headers = {"Metadata-Flavor": "Google"} if flavor else {}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def as_requests_send(host: str) -> tuple[str, str]:
    """GCE_METADATA_HOST's `metadata:SECRET@host:port` as the address and the Authorization header that
    requests sends for it."""
    userinfo, _, address = host.rpartition("@")
    return address, basic_authorization(userinfo.partition(":")[2])


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "GOOGLE_APPLICATION"))}
    env.update(extra, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return env


def test_google_auth_mints_through_the_emulator_and_verifies_against_its_certs(
    emulator: IdentityEmulator,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MINT], env=subprocess_env(emulator.env_for(ALICE)),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    module, email, token = done.stdout.split()
    assert module == "google.auth.compute_engine.credentials" and email == ALICE
    claims = google.oauth2.id_token.verify_token(
        token, google.auth.transport.requests.Request(), audience=AUD, certs_url=emulator.certs_url
    )
    assert claims["email"] == ALICE and claims["email_verified"] is True
    assert claims["iss"] == "https://accounts.google.com" and claims["aud"] == AUD
    assert claims["exp"] - claims["iat"] == 3600 and claims["sub"] == claims["azp"]
    assert emulator.identity_requests(ALICE, AUD) == 1


def test_metadata_endpoints(emulator: IdentityEmulator) -> None:
    root = f"http://{emulator.metadata_host(ALICE)}"
    secret = emulator.authorization(ALICE)
    status, headers, _ = get(root + "/", authorization=secret)
    assert status == 200 and headers["Metadata-Flavor"] == "Google"
    sa = root + "/computeMetadata/v1/instance/service-accounts/default/"
    assert get(sa + "email", authorization=secret)[2] == ALICE
    status, headers, body = get(sa + "?recursive=true", authorization=secret)
    assert (
        status == 200 and headers["Content-Type"] == "application/json" and json.loads(body)["email"] == ALICE
    )
    assert get(root + "/computeMetadata/v1/project/project-id", authorization=secret)[2] == "local-project"
    status, _, token = get(sa + "identity?audience=" + AUD + "&format=full", authorization=secret)
    assert status == 200 and token.count(".") == 2
    assert get(sa + "identity?audience=" + AUD, flavor=False, authorization=secret)[0] == 403
    assert get(sa + "identity", authorization=secret)[0] == 400
    other = root + "/computeMetadata/v1/instance/service-accounts/someone-else@x/email"
    assert get(other, authorization=secret)[0] == 404
    assert emulator.identity_requests(ALICE, AUD) == 1  # the refused ones do not count


def test_a_process_not_given_the_accounts_secret_cannot_mint(emulator: IdentityEmulator) -> None:
    bob = "bob@proj.iam.gserviceaccount.com"
    emulator.add_account(bob)
    identity = f"http://{emulator.metadata_host(ALICE)}/computeMetadata/v1/instance/service-accounts/default/"
    for authorization in (
        "",
        "Basic bWV0YWRhdGE6Z3Vlc3M=",
        emulator.authorization(bob),
    ):  # none, a guess, Bob's
        for path in ("identity?audience=" + AUD, "email", "?recursive=true"):
            status, headers, body = get(identity + path, authorization=authorization)
            assert status == 403 and headers["Metadata-Flavor"] == "Google", (path, status, body)
            assert "did not carry the account's secret" in body
    # google-auth's own path, as a local process that knows only the address would run it: no identity.
    address = {
        "GCE_METADATA_HOST": emulator.metadata_host(ALICE),
        "GCE_METADATA_IP": emulator.metadata_host(ALICE),
    }
    done = subprocess.run(
        [sys.executable, "-c", MINT], env=subprocess_env({**address, "GCE_METADATA_DETECT_RETRIES": "1"}),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "DefaultCredentialsError" in done.stderr, done.stderr[-3000:]
    assert emulator.identity_requests() == 0
    # The same process, given the secret, mints (so the refusal above is the secret's doing, not the path's).
    done = subprocess.run(
        [sys.executable, "-c", MINT], env=subprocess_env(emulator.env_for(ALICE)),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.split()[1] == ALICE, done.stderr[-3000:]
    assert emulator.identity_requests(ALICE, AUD) == 1


def test_each_account_has_its_own_secret_kept_across_a_restart(emulator: IdentityEmulator) -> None:
    bob = "bob@proj.iam.gserviceaccount.com"
    assert emulator.env_for(ALICE)["GCE_METADATA_HOST"] != emulator.env_for(bob)["GCE_METADATA_HOST"]
    before = emulator.env_for(ALICE)
    emulator.stop()
    emulator.start()
    assert emulator.env_for(ALICE) == before
    address, authorization = as_requests_send(before["GCE_METADATA_HOST"])
    assert get(f"http://{address}/", authorization=authorization)[0] == 200


def test_certs_are_published_with_cache_headers(emulator: IdentityEmulator) -> None:
    status, headers, body = get(emulator.certs_url, flavor=False)
    assert status == 200 and headers["Cache-Control"] == "public, max-age=123"
    pems = json.loads(body)
    assert list(pems) == [emulator.signing_key.kid]
    assert pems[emulator.signing_key.kid].startswith("-----BEGIN CERTIFICATE-----")
    jwks = json.loads(get(emulator.jwks_url, flavor=False)[2])
    assert [k["kid"] for k in jwks["keys"]] == [emulator.signing_key.kid]
    old = emulator.signing_key.kid
    new = emulator.rotate_key().kid
    assert sorted(json.loads(get(emulator.certs_url)[2])) == sorted([old, new])
    emulator.rotate_key(keep_previous=False)
    assert new not in json.loads(get(emulator.certs_url)[2])


def test_certs_endpoint_can_go_down_and_come_back_on_the_same_port(emulator: IdentityEmulator) -> None:
    url = emulator.certs_url
    emulator.stop_certs()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    emulator.start_certs()
    assert emulator.certs_url == url and get(url)[0] == 200


def test_mint_overrides_claims_and_header(emulator: IdentityEmulator) -> None:
    import base64

    token = emulator.mint(ALICE, AUD, iss="https://evil.example", email=None, header={"kid": "x"})
    head, body = (json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))) for s in token.split(".")[:2])
    assert head == {"alg": "RS256", "kid": "x", "typ": "JWT"}
    assert body["iss"] == "https://evil.example" and "email" not in body and body["aud"] == AUD


def test_stop_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    emulator = IdentityEmulator().start()
    for i in range(3):
        emulator.add_account(f"sa{i}@proj.iam.gserviceaccount.com")
    for i in range(3):
        get(emulator.certs_url)
        account = f"sa{i}@proj.iam.gserviceaccount.com"
        get(f"http://{emulator.metadata_host(account)}/", authorization=emulator.authorization(account))
    emulator.stop()
    assert set(threading.enumerate()) <= before


def test_runs_as_a_program_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "emulators.identity", "--account", ALICE, "--certs-max-age", "7"],
        env=subprocess_env({}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        described = json.loads(process.stdout.readline())
        assert described["accounts"][ALICE]["GCE_METADATA_HOST"].startswith("metadata:")
        status, headers, _ = get(described["certs_url"])
        assert status == 200 and headers["Cache-Control"] == "public, max-age=7"
        host, authorization = as_requests_send(described["accounts"][ALICE]["GCE_METADATA_HOST"])
        email = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/email"
        assert get(email, authorization=authorization)[2] == ALICE
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
