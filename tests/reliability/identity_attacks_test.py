"""Identity attacks on a real routeguide process that verifies ID tokens (AUTH_AUDIENCE): each forged, stale,
misdirected or misplaced token against every kind of RPC is rejected with its status, none is accepted, and
neither the error messages nor the service's own log lines (its stdout) carry any token material or key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from emulators.identity import IdentityEmulator, SigningKey
from routeguide.route_guide_pb2 import Point, Rectangle, RouteNote
from tests.reliability import calls, h2c
from tests.reliability.processes import Service

pytestmark = pytest.mark.asyncio(loop_scope="module")

AUDIENCE = "https://routeguide.reliability.test"
ALICE = "alice@reliability.iam.gserviceaccount.com"
MALLORY = "mallory@reliability.iam.gserviceaccount.com"


def verifying(emulator: IdentityEmulator | str) -> dict[str, str]:
    """The settings of a service that verifies tokens for AUDIENCE from `emulator` (or this certs URL) and
    admits ALICE only."""
    certs_url = emulator if isinstance(emulator, str) else emulator.certs_url
    return {"AUTH_AUDIENCE": AUDIENCE, "AUTH_CERTS_URL": certs_url, "AUTH_ALLOWED_CALLERS": ALICE}


HERE = Point(latitude=409146138, longitude=-746188906)
Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]

# One method of each kind: the identity check must hold for all four.
METHODS = [
    "/routeguide.RouteGuide/GetFeature",
    "/routeguide.RouteGuide/ListFeatures",
    "/routeguide.RouteGuide/RecordRoute",
    "/routeguide.RouteGuide/RouteChat",
]
REQUESTS = {
    METHODS[0]: [HERE.SerializeToString()],
    METHODS[1]: [Rectangle(lo=HERE, hi=HERE).SerializeToString()],
    METHODS[2]: [HERE.SerializeToString()] * 2,
    METHODS[3]: [RouteNote(location=HERE, message="hi").SerializeToString()],
}


@dataclass(frozen=True)
class Attack:
    metadata: Callable[[IdentityEmulator], Metadata]
    code: grpc.StatusCode
    fragment: str  # expected in the status message
    # Another outcome that is just as precise, when a layer below the verifier may answer first.
    alternative: tuple[grpc.StatusCode, str] | None = None


def bearer(token: str, header: str = "authorization") -> Metadata:
    return ((header, f"Bearer {token}"),)


def _now() -> int:
    return int(time.time())


STRANGER = SigningKey.generate()  # a well-formed key the issuer never published


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# A header of JSON nested deeper than Python's recursion limit, within the 8 KiB token cap.
DEEP_TOKEN = f"{b64url(b'[' * 2000 + b']' * 2000)}.{b64url(b'{}')}.c2ln"

ATTACKS: dict[str, Attack] = {
    "no token": Attack(lambda e: (), Code.UNAUTHENTICATED, "missing credentials"),
    "empty token": Attack(lambda e: (("authorization", "Bearer "),), Code.UNAUTHENTICATED, "malformed token"),
    "empty header": Attack(lambda e: (("authorization", ""),), Code.UNAUTHENTICATED, "missing credentials"),
    "malformed": Attack(lambda e: bearer("abc.def"), Code.UNAUTHENTICATED, "malformed token"),
    "garbage segments": Attack(lambda e: bearer("eyJ!!.eyJ!!.sig"), Code.UNAUTHENTICATED, "malformed token"),
    "header nested too deep": Attack(lambda e: bearer(DEEP_TOKEN), Code.UNAUTHENTICATED, "malformed token"),
    "alg none": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, header={"alg": "none"})), Code.UNAUTHENTICATED, "RS256"
    ),
    "HS256 keyed with the public key": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, header={"alg": "HS256"})), Code.UNAUTHENTICATED, "RS256"
    ),
    "wrong key, unknown kid": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, key=STRANGER)), Code.UNAUTHENTICATED, "unknown key"
    ),
    "wrong key, published kid": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, key=STRANGER, header={"kid": e.signing_key.kid})),
        Code.UNAUTHENTICATED,
        "invalid token signature",
    ),
    "expired": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, iat=_now() - 7200, exp=_now() - 3600)),
        Code.UNAUTHENTICATED,
        "token expired",
    ),
    "not yet valid (iat)": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, iat=_now() + 600, exp=_now() + 4200)),
        Code.UNAUTHENTICATED,
        "not yet valid",
    ),
    "not yet valid (nbf)": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, nbf=_now() + 600)), Code.UNAUTHENTICATED, "not yet valid"
    ),
    "wrong audience": Attack(
        lambda e: bearer(e.mint(ALICE, "https://aggregator.reliability.test")),
        Code.UNAUTHENTICATED,
        f"audience mismatch: expected {AUDIENCE}",
    ),
    "wrong issuer": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, iss="https://issuer.evil.test")),
        Code.UNAUTHENTICATED,
        "issuer mismatch",
    ),
    "caller not allowed": Attack(
        lambda e: bearer(e.mint(MALLORY, AUDIENCE)), Code.PERMISSION_DENIED, f"caller not allowed: {MALLORY}"
    ),
    "oversized token": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE, padding="x" * 7000)),
        Code.UNAUTHENTICATED,
        "token too large",
        # A token over the verifier's 8 KiB cap makes the headers pass gRPC's 8 KiB soft metadata limit, past
        # which gRPC refuses a random share of calls itself.
        alternative=(Code.RESOURCE_EXHAUSTED, "metadata size exceeds soft limit"),
    ),
    "token in the wrong header": Attack(
        lambda e: bearer(e.mint(ALICE, AUDIENCE), header="x-id-token"),
        Code.UNAUTHENTICATED,
        "missing credentials",
    ),
    "token without the Bearer scheme": Attack(
        lambda e: (("authorization", e.mint(ALICE, AUDIENCE)),), Code.UNAUTHENTICATED, "missing credentials"
    ),
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routeguide(emulator: IdentityEmulator) -> AsyncIterator[Service]:
    service = await Service("routeguide", verifying(emulator)).start()
    yield service
    assert await service.stop() == 0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def channel(routeguide: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with calls.insecure(routeguide.address) as opened:
        yield opened


SENT: list[str] = []  # every header value the attacks sent, for the leak check at the end


def secrets_of(emulator: IdentityEmulator) -> list[str]:
    """What must never be printed: every JWT segment or header value sent, and the signing keys."""
    found = []
    for value in SENT:
        token = value.removeprefix("Bearer ").strip()
        found += [segment for segment in token.split(".") if len(segment) > 8]
        if len(token) > 16:
            found.append(token)
    for key in (emulator.signing_key, STRANGER):
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        found += [line for line in pem.splitlines() if len(line) > 40]  # the base64 body of the key
    return found


class Rejected(NamedTuple):
    code: grpc.StatusCode
    details: str


async def attack(channel: grpc.aio.Channel, method: str, metadata: Metadata) -> Rejected | None:
    """The call's rejection, or None when it was accepted."""
    SENT.extend(value for _, value in metadata)
    request_streaming, response_streaming = calls.METHODS[method]
    if request_streaming:
        # The verdict first, with no request written: a client still writing when a rejection arrives may
        # report its own INTERNAL "Internal error from Core" instead of the server's status (a grpc.aio race).
        kind = channel.stream_stream if response_streaming else channel.stream_unary
        call = kind(method)(metadata=metadata, timeout=10)
        try:
            code = await asyncio.wait_for(asyncio.shield(call.code()), 1.0)
        except asyncio.TimeoutError:  # no verdict: the server waits for requests, so the call was accepted
            for payload in REQUESTS[method]:
                await call.write(payload)
            await call.done_writing()
            if response_streaming:  # the replies (earlier notes) must be read for the call to end
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for _ in call:
                        pass
            code = await call.code()
        return None if code == Code.OK else Rejected(code, await call.details() or "")
    try:
        await calls.raw_call(channel, method, REQUESTS[method], metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as err:
        return Rejected(err.code(), err.details() or "")
    return None


async def test_a_valid_token_is_accepted_on_every_kind_of_call(
    channel: grpc.aio.Channel, emulator: IdentityEmulator
) -> None:
    # The control: without it, "everything is rejected" would pass for a broken service too.
    for method in METHODS:
        assert await attack(channel, method, bearer(emulator.mint(ALICE, AUDIENCE))) is None


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rpartition("/")[2])
@pytest.mark.parametrize("name", list(ATTACKS))
async def test_each_attack_is_rejected_with_its_status(
    channel: grpc.aio.Channel, emulator: IdentityEmulator, name: str, method: str
) -> None:
    expected = ATTACKS[name]
    metadata = expected.metadata(emulator)
    error = await attack(channel, method, metadata)
    assert error is not None, f"{name} was accepted by {method}"
    outcome = (error.code, error.details)
    allowed = [(expected.code, expected.fragment), *([expected.alternative] if expected.alternative else [])]
    assert any(code == outcome[0] and fragment in outcome[1] for code, fragment in allowed), outcome


async def test_a_token_beyond_the_transport_header_limit_is_refused(
    channel: grpc.aio.Channel, emulator: IdentityEmulator
) -> None:
    # Far past what the verifier reads: gRPC's own metadata limit refuses it before any handler runs.
    for method in METHODS:
        error = await attack(channel, method, bearer(emulator.mint(ALICE, AUDIENCE, padding="x" * 40_000)))
        assert error is not None and error.code == Code.RESOURCE_EXHAUSTED, error


async def test_no_token_or_key_appears_in_any_error_message_or_log_line(
    channel: grpc.aio.Channel, emulator: IdentityEmulator, routeguide: Service
) -> None:
    details = []
    for name, expected in ATTACKS.items():
        for method in METHODS:
            error = await attack(channel, method, expected.metadata(emulator))
            assert error is not None, name
            details.append(error.details)
    secrets = secrets_of(emulator)
    assert len(secrets) > 100  # the check below has something to look for
    output = "\n".join(routeguide.lines)
    # Every rejection is logged, with the method and the reason (and nothing more).
    rejections = [
        m for m in routeguide.messages() if m.startswith("rejected call to /routeguide.RouteGuide/")
    ]
    # (Oversized tokens refused by gRPC itself never reach the verifier, so are not among them.)
    assert len(rejections) >= (len(ATTACKS) - 1) * len(METHODS), output[-2000:]
    for secret in secrets:
        assert secret not in output
        assert not any(secret in detail for detail in details)
    assert "eyJ" not in output and "PRIVATE KEY" not in output


def _segments_with_a_non_ascii_byte(e: IdentityEmulator) -> list[str]:
    """A valid token with one byte outside ASCII put in its header, payload or signature segment."""
    token = e.mint(ALICE, AUDIENCE)
    header, payload, signature = token.split(".")
    return [
        f"{header}\u00e9.{payload}.{signature}",
        f"{header}.{payload}\u00e9.{signature}",
        f"{token}\u00e9",
    ]


async def test_a_token_with_non_ascii_bytes_is_malformed_on_the_wire_with_no_traceback(
    routeguide: Service, emulator: IdentityEmulator
) -> None:
    # Raw HTTP/2: a gRPC client will not send a header value outside ASCII, a raw one can (UTF-8 bytes here).
    before = len(routeguide.lines)
    for token in _segments_with_a_non_ascii_byte(emulator):
        for method in METHODS:
            frames = [(b"".join(h2c.grpc_message(r) for r in REQUESTS[method]), True)]
            outcome = await h2c.exchange(
                "127.0.0.1", routeguide.port, method, frames, metadata=(("authorization", f"Bearer {token}"),)
            )
            assert outcome.grpc_status == Code.UNAUTHENTICATED.value[0], (method, outcome)
            assert "malformed token" in (outcome.value("grpc-message") or ""), (method, outcome)
    assert not any("Traceback" in line for line in routeguide.lines[before:]), routeguide.lines[before:][-5:]


async def test_a_token_nested_too_deep_logs_no_traceback(
    channel: grpc.aio.Channel, routeguide: Service
) -> None:
    before = len(routeguide.lines)
    for method in METHODS:
        error = await attack(channel, method, bearer(DEEP_TOKEN))
        assert error is not None and error.code == Code.UNAUTHENTICATED, error
    assert not any("Traceback" in line for line in routeguide.lines[before:]), routeguide.lines[before:][-5:]


@pytest.mark.parametrize("header", ["authorization", "x-serverless-authorization"])
async def test_a_credential_header_sent_twice_is_refused(
    channel: grpc.aio.Channel, emulator: IdentityEmulator, header: str
) -> None:
    # One valid and one forged value, in both orders: whichever copy a reader takes, the call must not pass.
    valid, forged = f"Bearer {emulator.mint(ALICE, AUDIENCE)}", "Bearer forged.token.value"
    for values in ((valid, forged), (forged, valid), (valid, valid)):
        for method in METHODS:
            error = await attack(channel, method, tuple((header, value) for value in values))
            assert error is not None, (header, values, method)
            assert error.code == Code.UNAUTHENTICATED and f"more than one '{header}'" in error.details, error


async def test_allow_listed_emails_match_whatever_their_case(
    channel: grpc.aio.Channel, emulator: IdentityEmulator
) -> None:
    for method in METHODS:
        assert await attack(channel, method, bearer(emulator.mint(ALICE.upper(), AUDIENCE))) is None, method


def spellings(token: str) -> dict[str, str]:
    """Other base64url spellings of the same token bytes, which a lenient decoder accepts as the same token."""
    segments = token.split(".")
    found: dict[str, str] = {}
    for at, segment in enumerate(segments):

        def variant(new: str) -> str:
            return ".".join([*segments[:at], new, *segments[at + 1 :]])

        if "-" in segment or "_" in segment:
            found["+/ alphabet"] = variant(segment.replace("-", "+").replace("_", "/"))
        if len(segment) % 4:
            found["= padding"] = variant(segment + "=" * (-len(segment) % 4))
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            last = alphabet[alphabet.index(segment[-1]) ^ 1]  # a low bit past the data's last byte
            found["non-zero trailing bits"] = variant(segment[:-1] + last)
    return found


async def test_only_the_canonical_spelling_of_a_token_is_accepted(
    channel: grpc.aio.Channel, emulator: IdentityEmulator
) -> None:
    for sub in range(20):  # until a token's segments hold '-' or '_' (almost always the first)
        token = emulator.mint(ALICE, AUDIENCE, sub=f"canonical-{sub}")
        variants = spellings(token)
        if len(variants) == 3:
            break
    assert len(variants) == 3, variants
    for method in METHODS:
        assert await attack(channel, method, bearer(token)) is None, method
        for name, variant in variants.items():
            error = await attack(channel, method, bearer(variant))
            assert error is not None, f"{name} accepted by {method}"
            assert error.code == Code.UNAUTHENTICATED and "not canonical base64url" in error.details, error
