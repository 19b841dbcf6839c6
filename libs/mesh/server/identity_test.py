"""ServerChain (identity) + TokenVerifier on a real grpc.aio server, with tokens from the identity emulator."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from emulators.identity import IdentityEmulator, SigningKey
from mesh.server import AuthError, Caller, ServerChain, TokenVerifier, current_caller
from mesh.testing import eventually, start_loopback
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2 as rg
from routeguide import route_guide_pb2_grpc as rg_grpc

ALICE = "alice@proj.iam.gserviceaccount.com"
MALLORY = "mallory@proj.iam.gserviceaccount.com"
AUDIENCE = "https://svc.example"
Code = grpc.StatusCode


def _who() -> str:
    caller = current_caller()
    return "anonymous" if caller is None else f"{caller.email}|{caller.audience}"


class Ping(ping_pb2_grpc.PingServiceServicer):
    async def Send(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        return ping_pb2.Response(pong=ping_pb2.Pong(index=1, message=_who()))

    async def SendUpstream(self, request: ping_pb2.Request, context: Any) -> ping_pb2.Response:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no upstream in this test")
        raise AssertionError("unreachable")


class RouteGuide(rg_grpc.RouteGuideServicer):
    """Each RPC kind answers with the caller it sees, so tests read what the handler saw."""

    async def GetFeature(self, request: rg.Point, context: Any) -> rg.Feature:
        return rg.Feature(name=_who())

    async def ListFeatures(self, request: rg.Rectangle, context: Any) -> AsyncIterator[rg.Feature]:
        for _ in range(2):
            await asyncio.sleep(0)
            yield rg.Feature(name=_who())

    async def RecordRoute(self, request_iterator: AsyncIterator[rg.Point], context: Any) -> rg.RouteSummary:
        count = 0
        async for _ in request_iterator:
            count += 1
        return rg.RouteSummary(point_count=count if _who().startswith(ALICE) else -1)

    async def RouteChat(
        self, request_iterator: AsyncIterator[rg.RouteNote], context: Any
    ) -> AsyncIterator[rg.RouteNote]:
        async for note in request_iterator:
            yield rg.RouteNote(location=note.location, message=_who())


@pytest.fixture(scope="module")
def emulator() -> Iterator[IdentityEmulator]:
    with IdentityEmulator() as emu:
        yield emu


class Mesh:
    def __init__(self, server: grpc.aio.Server, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.ping = cast("ping_pb2_grpc.PingServiceAsyncStub", ping_pb2_grpc.PingServiceStub(channel))
        self.routes = cast("rg_grpc.RouteGuideAsyncStub", rg_grpc.RouteGuideStub(channel))
        self.health = health_pb2_grpc.HealthStub(channel)


async def unavailable_until_served(call: Awaitable[str]) -> str:
    """What `call` answers; a failure other than UNAVAILABLE (the keys still out) fails the test at once."""
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == Code.UNAVAILABLE, err
        raise


async def start(verifier: TokenVerifier, **chain: Any) -> Mesh:
    """Ping, RouteGuide and health behind a ServerChain with `verifier` (and `chain`'s other arguments)."""
    served = await start_loopback(
        functools.partial(ping_pb2_grpc.add_PingServiceServicer_to_server, Ping()),
        functools.partial(rg_grpc.add_RouteGuideServicer_to_server, RouteGuide()),
        functools.partial(health_pb2_grpc.add_HealthServicer_to_server, health.aio.HealthServicer()),  # type: ignore[attr-defined]
        chain=ServerChain(verifier=verifier, **chain),
        # gRPC's own 8 KiB metadata limit would turn an oversized token into RESOURCE_EXHAUSTED before the
        # verifier sees it; raised here so the verifier's own bound is what the oversized case tests.
        options=[("grpc.max_metadata_size", 64 * 1024)],
    )
    return Mesh(served.server, served.channel())


@pytest.fixture
async def mesh(emulator: IdentityEmulator) -> AsyncIterator[Mesh]:
    m = await start(TokenVerifier(AUDIENCE, emulator.certs_url, allowed_callers=frozenset({ALICE})))
    yield m
    await m.channel.close(None)
    await m.server.stop(None)


def bearer(token: str, header: str = "authorization") -> tuple[tuple[str, str], ...]:
    return ((header, f"Bearer {token}"),)


# One call per RPC kind; each returns what the handler saw.
async def call_unary(m: Mesh, md: Any) -> str:
    return str((await m.ping.Send(ping_pb2.Request(message="hi"), metadata=md, timeout=10)).pong.message)


async def call_server_stream(m: Mesh, md: Any) -> str:
    names = [f.name async for f in m.routes.ListFeatures(rg.Rectangle(), metadata=md, timeout=10)]
    assert len(names) == 2 and names[0] == names[1]
    return str(names[0])


async def call_client_stream(m: Mesh, md: Any) -> str:
    async def points() -> AsyncIterator[rg.Point]:
        for i in range(3):
            yield rg.Point(latitude=i)

    summary = await m.routes.RecordRoute(points(), metadata=md, timeout=10)
    return "ok" if summary.point_count == 3 else "wrong caller"


async def call_bidi(m: Mesh, md: Any) -> str:
    async def notes() -> AsyncIterator[rg.RouteNote]:
        yield rg.RouteNote(message="a")

    replies = [n.message async for n in m.routes.RouteChat(notes(), metadata=md, timeout=10)]
    return str(replies[0])


ALL_KINDS: list[Callable[[Mesh, Any], Awaitable[str]]] = [
    call_unary,
    call_server_stream,
    call_client_stream,
    call_bidi,
]


@pytest.mark.parametrize("call", ALL_KINDS, ids=lambda f: f.__name__)
async def test_handler_sees_the_verified_caller_for_every_rpc_kind(
    mesh: Mesh, emulator: IdentityEmulator, call: Callable[[Mesh, Any], Awaitable[str]]
) -> None:
    seen = await call(mesh, bearer(emulator.mint(ALICE, AUDIENCE)))
    assert seen in (f"{ALICE}|{AUDIENCE}", "ok")


async def test_cloud_run_serverless_header_is_accepted_and_preferred(
    mesh: Mesh, emulator: IdentityEmulator
) -> None:
    good = emulator.mint(ALICE, AUDIENCE)
    md = (("authorization", "Bearer app-level-token"), ("x-serverless-authorization", f"Bearer {good}"))
    assert await call_unary(mesh, md) == f"{ALICE}|{AUDIENCE}"
    assert await call_server_stream(mesh, bearer(good, "x-serverless-authorization")) == f"{ALICE}|{AUDIENCE}"


async def test_contexts_do_not_leak_between_calls(mesh: Mesh, emulator: IdentityEmulator) -> None:
    # Authenticated and rejected calls interleaved on one channel: a rejected call never runs the handler,
    # and every accepted one sees its own caller.
    good = bearer(emulator.mint(ALICE, AUDIENCE))
    results = await asyncio.gather(
        *(call_unary(mesh, good if i % 2 == 0 else ()) for i in range(40)), return_exceptions=True
    )
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert result == f"{ALICE}|{AUDIENCE}"
        else:
            assert isinstance(result, grpc.aio.AioRpcError) and result.code() == Code.UNAUTHENTICATED


def _forgeries(emu: IdentityEmulator) -> dict[str, tuple[Any, Any, str]]:
    """name -> (metadata, expected status, expected message fragment)."""
    now = int(time.time())
    stranger = SigningKey.generate()
    header_b64 = emu.mint(ALICE, AUDIENCE).split(".")[0]
    return {
        "no token": ((), Code.UNAUTHENTICATED, "missing credentials"),
        "malformed": (bearer("not-a-jwt"), Code.UNAUTHENTICATED, "malformed token"),
        "bad base64": (bearer(f"{header_b64}.%%%.abc"), Code.UNAUTHENTICATED, "malformed token"),
        "empty bearer": ((("authorization", "Bearer "),), Code.UNAUTHENTICATED, "malformed token"),
        "alg none": (
            bearer(emu.mint(ALICE, AUDIENCE, header={"alg": "none"})),
            Code.UNAUTHENTICATED,
            "RS256",
        ),
        "hs256 with public cert": (
            bearer(emu.mint(ALICE, AUDIENCE, header={"alg": "HS256"})),
            Code.UNAUTHENTICATED,
            "RS256",
        ),
        "unpublished key": (
            bearer(emu.mint(ALICE, AUDIENCE, key=stranger)),
            Code.UNAUTHENTICATED,
            "unknown key",
        ),
        "wrong key, published kid": (
            bearer(emu.mint(ALICE, AUDIENCE, key=stranger, header={"kid": emu.signing_key.kid})),
            Code.UNAUTHENTICATED,
            "invalid token signature",
        ),
        "expired": (
            bearer(emu.mint(ALICE, AUDIENCE, iat=now - 7200, exp=now - 3600)),
            Code.UNAUTHENTICATED,
            "token expired",
        ),
        "issued in the future": (
            bearer(emu.mint(ALICE, AUDIENCE, iat=now + 600, exp=now + 4200)),
            Code.UNAUTHENTICATED,
            "not yet valid",
        ),
        "nbf in the future": (
            bearer(emu.mint(ALICE, AUDIENCE, nbf=now + 600)),
            Code.UNAUTHENTICATED,
            "not yet valid",
        ),
        "no exp": (bearer(emu.mint(ALICE, AUDIENCE, exp=None)), Code.UNAUTHENTICATED, "'exp'"),
        "wrong audience": (
            bearer(emu.mint(ALICE, "https://other.example")),
            Code.UNAUTHENTICATED,
            f"audience mismatch: expected {AUDIENCE}",
        ),
        "wrong issuer": (
            bearer(emu.mint(ALICE, AUDIENCE, iss="https://evil.example")),
            Code.UNAUTHENTICATED,
            "issuer mismatch",
        ),
        "caller not allowed": (
            bearer(emu.mint(MALLORY, AUDIENCE)),
            Code.PERMISSION_DENIED,
            f"caller not allowed: {MALLORY}",
        ),
        "unverified email": (
            bearer(emu.mint(ALICE, AUDIENCE, email_verified=False)),
            Code.PERMISSION_DENIED,
            "caller not allowed",
        ),
        "oversized": (
            bearer(emu.mint(ALICE, AUDIENCE, padding="x" * 9000)),
            Code.UNAUTHENTICATED,
            "token too large",
        ),
        "wrong header": (
            bearer(emu.mint(ALICE, AUDIENCE), "x-id-token"),
            Code.UNAUTHENTICATED,
            "missing credentials",
        ),
        "no bearer scheme": (
            (("authorization", emu.mint(ALICE, AUDIENCE)),),
            Code.UNAUTHENTICATED,
            "missing credentials",
        ),
    }


FORGERY_NAMES = [
    "no token", "malformed", "bad base64", "empty bearer", "alg none", "hs256 with public cert", "unpublished key",
    "wrong key, published kid", "expired", "issued in the future", "nbf in the future", "no exp", "wrong audience",
    "wrong issuer", "caller not allowed", "unverified email", "oversized", "wrong header", "no bearer scheme",
]  # fmt: skip


def test_every_forgery_is_exercised(emulator: IdentityEmulator) -> None:
    assert sorted(FORGERY_NAMES) == sorted(_forgeries(emulator))


async def _refused(
    call: Callable[[Mesh, Any], Awaitable[str]], mesh: Mesh, metadata: Any, code: grpc.StatusCode
) -> str:
    """The details of `call`'s refusal with `code`."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(mesh, metadata)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


@pytest.mark.parametrize("name", FORGERY_NAMES)
@pytest.mark.parametrize("call", [call_unary, call_server_stream], ids=lambda f: f.__name__)
async def test_each_failure_maps_to_its_status(
    mesh: Mesh, emulator: IdentityEmulator, name: str, call: Callable[[Mesh, Any], Awaitable[str]]
) -> None:
    metadata, code, fragment = _forgeries(emulator)[name]
    details = await _refused(call, mesh, metadata, code)
    assert fragment in details
    # Messages never echo token material.
    for _, value in metadata:
        token = value.removeprefix("Bearer ")
        for segment in filter(None, token.split(".")):
            if len(segment) > 8:
                assert segment not in details


async def _idle() -> AsyncIterator[Any]:
    # Sends nothing: the verdict comes from the headers alone. A client still writing when the server
    # rejects the call may see gRPC core's INTERNAL "Internal error from Core" instead of the real status.
    await asyncio.Event().wait()
    yield


async def reject_client_stream(m: Mesh, md: Any) -> str:
    return str(await m.routes.RecordRoute(_idle(), metadata=md, timeout=10))


async def reject_bidi(m: Mesh, md: Any) -> str:
    return str([n async for n in m.routes.RouteChat(_idle(), metadata=md, timeout=10)])


@pytest.mark.parametrize("call", [reject_client_stream, reject_bidi], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["no token", "expired", "caller not allowed"])
async def test_client_and_bidi_streams_are_rejected_too(
    mesh: Mesh, emulator: IdentityEmulator, name: str, call: Callable[[Mesh, Any], Awaitable[str]]
) -> None:
    metadata, code, fragment = _forgeries(emulator)[name]
    assert fragment in await _refused(call, mesh, metadata, code)


async def test_health_is_reachable_without_a_token(mesh: Mesh) -> None:
    reply = await mesh.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_method_is_unimplemented_not_a_crash(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/ping.PingService/Nope", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"", timeout=10)
    assert info.value.code() == Code.UNIMPLEMENTED


async def test_verified_tokens_are_cached_until_they_expire(emulator: IdentityEmulator) -> None:
    verifier = TokenVerifier(AUDIENCE, emulator.certs_url, clock_skew_s=0)
    token = emulator.mint(ALICE, AUDIENCE)
    first = await verifier.verify(token)
    assert (await verifier.verify(token)) is first  # a cache hit, not a second verification
    expires = int(time.time()) + 1
    short = emulator.mint(ALICE, AUDIENCE, exp=expires)
    assert isinstance(await verifier.verify(short), Caller)
    await asyncio.sleep(max(0.0, expires - time.time()) + 1.1)
    with pytest.raises(AuthError) as info:
        await verifier.verify(short)  # the cached entry expires with the token
    assert info.value.code == Code.UNAUTHENTICATED and info.value.message == "token expired"


async def test_key_rotation_refetches_certs_once() -> None:
    with IdentityEmulator() as emu:
        verifier = TokenVerifier(AUDIENCE, emu.certs_url, refetch_interval_s=0)
        m = await start(verifier)
        try:
            assert await call_unary(m, bearer(emu.mint(ALICE, AUDIENCE))) == f"{ALICE}|{AUDIENCE}"
            assert emu.certs_requests == 1
            emu.rotate_key(keep_previous=False)
            assert await call_unary(m, bearer(emu.mint(ALICE, AUDIENCE, sub="2"))) == f"{ALICE}|{AUDIENCE}"
            assert emu.certs_requests == 2
            # More tokens from the new key: no further fetches (the certs are cached per max-age).
            for i in range(5):
                await call_unary(m, bearer(emu.mint(ALICE, AUDIENCE, sub=str(10 + i))))
            assert emu.certs_requests == 2
        finally:
            await m.channel.close(None)
            await m.server.stop(None)


async def test_unknown_key_ids_cannot_force_a_fetch_per_call() -> None:
    with IdentityEmulator() as emu:
        verifier = TokenVerifier(AUDIENCE, emu.certs_url, refetch_interval_s=3600)
        assert (await verifier.verify(emu.mint(ALICE, AUDIENCE))).email == ALICE
        stranger = SigningKey.generate()
        for i in range(20):
            with pytest.raises(AuthError) as info:
                await verifier.verify(emu.mint(ALICE, AUDIENCE, key=stranger, sub=str(i)))
            assert "unknown key" in str(info.value)
        assert emu.certs_requests == 1


async def test_certs_down_means_unavailable_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.identity")
    with IdentityEmulator() as emu:
        emu.stop_certs()
        verifier = TokenVerifier(AUDIENCE, emu.certs_url, certs_timeout_s=2, failure_backoff_s=0.05)
        m = await start(verifier)
        try:
            for i in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call_server_stream(m, bearer(emu.mint(ALICE, AUDIENCE, sub=str(i))))
                assert info.value.code() == Code.UNAVAILABLE
                assert "certs unavailable" in (info.value.details() or "")
                await asyncio.sleep(0.06)
            outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(outage_lines) == 1
            emu.start_certs()
            seen: str = await eventually(
                lambda: unavailable_until_served(call_unary(m, bearer(emu.mint(ALICE, AUDIENCE)))),
                every=0.1,
                retrying=(grpc.aio.AioRpcError,),
                what="verification after the keys came back",
            )
            assert seen == f"{ALICE}|{AUDIENCE}"
        finally:
            await m.channel.close(None)
            await m.server.stop(None)


async def test_stale_certs_are_used_while_the_endpoint_is_down() -> None:
    with IdentityEmulator(certs_max_age_s=0) as emu:
        verifier = TokenVerifier(AUDIENCE, emu.certs_url, certs_timeout_s=2)
        assert (await verifier.verify(emu.mint(ALICE, AUDIENCE))).email == ALICE
        emu.stop_certs()
        # max-age 0: every new token wants a refetch, which fails; the last good keys still verify.
        assert (await verifier.verify(emu.mint(ALICE, AUDIENCE, sub="other"))).subject == "other"


async def test_jwks_format_is_understood() -> None:
    with IdentityEmulator() as emu:
        verifier = TokenVerifier(AUDIENCE, emu.jwks_url)
        assert (await verifier.verify(emu.mint(ALICE, AUDIENCE))).email == ALICE


def test_verifier_refuses_an_empty_audience() -> None:
    with pytest.raises(ValueError):
        TokenVerifier("", "http://127.0.0.1:1/certs")


async def test_exempt_calls_never_see_an_earlier_callers_identity(emulator: IdentityEmulator) -> None:
    m = await start(TokenVerifier(AUDIENCE, emulator.certs_url), exempt_methods=("/ping.PingService/Send",))
    try:
        md = bearer(emulator.mint(ALICE, AUDIENCE))
        for _ in range(5):
            assert (
                await m.routes.GetFeature(rg.Point(), metadata=md, timeout=10)
            ).name == f"{ALICE}|{AUDIENCE}"
            assert await call_unary(m, ()) == "anonymous"
    finally:
        await m.channel.close(None)
        await m.server.stop(None)


async def test_an_allow_list_in_any_case_admits_its_callers(emulator: IdentityEmulator) -> None:
    verifier = TokenVerifier(AUDIENCE, emulator.certs_url, allowed_callers=frozenset({ALICE.title()}))
    assert (await verifier.verify(emulator.mint(ALICE, AUDIENCE))).email == ALICE
    with pytest.raises(AuthError) as info:
        await verifier.verify(emulator.mint(MALLORY, AUDIENCE))
    assert info.value.code == Code.PERMISSION_DENIED
