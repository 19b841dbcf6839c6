"""The issuer's certs endpoint, seen from a real routeguide process: unreachable at start-up, verification fails
closed (UNAVAILABLE, one clear warning) and recovers when it is back; unreachable later, the cached keys keep
verifying; rotated, tokens signed with the new key verify and tokens of a withdrawn key do not."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from emulators.identity import IdentityEmulator
from localmesh.supervisor import StartError
from mesh.server import AuthError, TokenVerifier
from routeguide.route_guide_pb2 import Point, RouteNote
from tests.reliability import calls
from tests.reliability.figures import report
from tests.reliability.identity_attacks_test import ALICE, AUDIENCE, bearer, verifying
from tests.reliability.processes import Service

HERE = Point(latitude=409146138, longitude=-746188906)
Call = Callable[[grpc.aio.Channel, str], Awaitable[object]]


async def unary(channel: grpc.aio.Channel, token: str) -> object:
    return await calls.routeguide(channel).GetFeature(HERE, metadata=bearer(token), timeout=10)


async def streaming(channel: grpc.aio.Channel, token: str) -> object:
    async def notes() -> AsyncIterator[RouteNote]:
        yield RouteNote(location=HERE, message="certs")

    chat = calls.routeguide(channel).RouteChat(notes(), metadata=bearer(token), timeout=10)
    return [note async for note in chat]


async def streaming_unsent(channel: grpc.aio.Channel, token: str) -> object:
    """RouteChat with nothing written: a refusal is judged on the headers alone. A client still writing when the
    server refuses may see gRPC core's INTERNAL "Internal error from Core" instead of the status (a grpc.aio
    race, RELIABILITY.md); accepted, this call would run into its deadline."""

    async def unsent() -> AsyncIterator[RouteNote]:
        await asyncio.Event().wait()
        yield RouteNote()  # pragma: no cover - never reached

    chat = calls.routeguide(channel).RouteChat(unsent(), metadata=bearer(token), timeout=10)
    return [note async for note in chat]


async def outcome(call: Call, channel: grpc.aio.Channel, token: str) -> grpc.StatusCode:
    try:
        await call(channel, token)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def both(channel: grpc.aio.Channel, token: str) -> object:
    """A unary and a streaming call with `token`: both must pass the same check."""
    await unary(channel, token)
    return await streaming(channel, token)


async def eventually_ok(call: Call, channel: grpc.aio.Channel, token: str) -> list[grpc.StatusCode]:
    """The codes seen until the call succeeds (bounded: about 10 s)."""
    seen = []
    for _ in range(40):
        seen.append(await outcome(call, channel, token))
        if seen[-1] == grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.25)
    return seen


def start(emulator: IdentityEmulator) -> Service:
    return Service("routeguide", verifying(emulator))


async def test_certs_unreachable_fails_closed_with_a_clear_log_then_recovers() -> None:
    with IdentityEmulator(certs_max_age_s=1) as emulator:
        emulator.stop_certs()  # before the service ever fetched them: it has no key at all
        service = await start(emulator).start()
        try:
            async with calls.insecure(service.address) as channel:
                token = emulator.mint(ALICE, AUDIENCE)
                for refused_call in (unary, streaming_unsent, unary, streaming_unsent):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await refused_call(channel, token)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert refused.value.details() == "cannot verify tokens: identity certs unavailable"
                emulator.start_certs()
                codes = await eventually_ok(unary, channel, token)
                assert codes[-1] == grpc.StatusCode.OK and set(codes) <= {
                    grpc.StatusCode.OK,
                    grpc.StatusCode.UNAVAILABLE,
                }
                assert await outcome(streaming, channel, token) == grpc.StatusCode.OK

                # Down again after a fetch: the keys it has keep verifying (fresh tokens, so no cache hit).
                emulator.stop_certs()
                await asyncio.sleep(1.2)  # past the certs' max-age: the service tries to refetch and fails
                for _ in range(3):
                    assert await outcome(both, channel, emulator.mint(ALICE, AUDIENCE)) == grpc.StatusCode.OK
        finally:
            assert await service.stop() == 0
        messages = service.messages()
        url = emulator.certs_url
        assert f"identity certs unreachable at {url} (URLError); rejecting calls with UNAVAILABLE" in messages
        assert f"identity certs reachable again at {url}" in messages
        assert f"identity certs unreachable at {url} (URLError); using cached keys" in messages
        # One warning per outage, not one per call.
        assert sum("identity certs unreachable" in m for m in messages) == 2


async def test_rotated_keys_verify_and_withdrawn_keys_do_not() -> None:
    with IdentityEmulator(certs_max_age_s=1) as emulator:
        service = await start(emulator).start()
        call = both
        try:
            async with calls.insecure(service.address) as channel:
                old_key = emulator.signing_key
                assert await outcome(call, channel, emulator.mint(ALICE, AUDIENCE)) == grpc.StatusCode.OK
                new_key = emulator.rotate_key()  # the old key stays published beside the new one
                codes = await eventually_ok(call, channel, emulator.mint(ALICE, AUDIENCE, key=new_key))
                assert codes[-1] == grpc.StatusCode.OK, codes
                assert (
                    await outcome(call, channel, emulator.mint(ALICE, AUDIENCE, key=old_key))
                    == grpc.StatusCode.OK
                )

                emulator.rotate_key(keep_previous=False)  # both earlier keys withdrawn
                withdrawn = emulator.mint(ALICE, AUDIENCE, key=old_key)
                seen = [await outcome(call, channel, withdrawn)]
                for _ in range(40):  # until the service has the new certs document (max-age 1 s)
                    if seen[-1] != grpc.StatusCode.OK:
                        break
                    await asyncio.sleep(0.25)
                    seen.append(await outcome(call, channel, emulator.mint(ALICE, AUDIENCE, key=old_key)))
                assert seen[-1] == grpc.StatusCode.UNAUTHENTICATED, seen
                assert await outcome(call, channel, emulator.mint(ALICE, AUDIENCE)) == grpc.StatusCode.OK
        finally:
            assert await service.stop() == 0


class _Redirect(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # stdlib signature
        pass


async def test_a_certs_url_that_redirects_is_not_followed() -> None:
    # Both ends on loopback, so the only thing refused is the redirect itself (in production it could lead from
    # https to http, or to another host).
    with IdentityEmulator() as emulator:
        handler = type("Redirect", (_Redirect,), {"target": emulator.certs_url})
        with ThreadingHTTPServer(("127.0.0.1", 0), handler) as redirector:
            threading.Thread(target=redirector.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{redirector.server_address[1]}/certs"
            service = await Service("routeguide", verifying(url)).start()
            try:
                async with calls.insecure(service.address) as channel:
                    token = emulator.mint(ALICE, AUDIENCE)
                    assert await outcome(unary, channel, token) == grpc.StatusCode.UNAVAILABLE
                    assert await outcome(streaming_unsent, channel, token) == grpc.StatusCode.UNAVAILABLE
                assert emulator.certs_requests == 0  # the redirect's target was never asked
                warnings = [m for m in service.messages() if "identity certs unreachable" in m]
                assert warnings and "RedirectRefused" in warnings[0], warnings
            finally:
                assert await service.stop() == 0
                redirector.shutdown()


async def test_a_plain_http_certs_url_off_loopback_stops_start_up() -> None:
    service = Service("routeguide", verifying("http://certs.example/v1"))
    with pytest.raises(StartError):
        await service.start(timeout=20)
    assert service.returncode == 2
    errors = [line for line in service.lines if line.startswith("config error:")]
    assert len(errors) == 1 and "AUTH_CERTS_URL" in errors[0] and "https://" in errors[0], service.lines


class CertsRelay:
    """A certs endpoint in front of the emulator's that can be made to hang: it accepts the request, then
    answers nothing until released (or 30 s have passed). Counts the requests it received."""

    def __init__(self, upstream: str) -> None:
        self.hanging = threading.Event()
        self.released = threading.Event()
        self.requests = 0
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                relay.requests += 1
                if relay.hanging.is_set():
                    relay.released.wait(30)
                    return
                with urllib.request.urlopen(upstream, timeout=5) as answer:  # loopback
                    body, cache_control = answer.read(), answer.headers.get("Cache-Control", "")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", cache_control)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # stdlib signature
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/certs"

    def __enter__(self) -> CertsRelay:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()


async def test_callers_queued_behind_a_hanging_certs_fetch_share_its_deadline() -> None:
    # Five new tokens, sent 0.5 s apart, while the certs endpoint hangs (the service has no key yet): one fetch,
    # and every call answered when its 5 s timeout ends, not one timeout after another (5, 10 ... 25 s).
    with IdentityEmulator() as emulator, CertsRelay(emulator.certs_url) as relay:
        relay.hanging.set()
        service = await Service("routeguide", verifying(relay.url)).start()
        try:
            async with calls.insecure(service.address) as channel:
                started = time.monotonic()

                async def new_token(index: int) -> tuple[grpc.StatusCode, float, float]:
                    await asyncio.sleep(0.5 * index)
                    sent = time.monotonic()
                    code = await outcome(
                        unary, channel, emulator.mint(ALICE, AUDIENCE, sub=f"queued-{index}")
                    )
                    return code, round(sent - started, 2), round(time.monotonic() - started, 2)

                answers = await asyncio.gather(*(new_token(i) for i in range(5)))
                fetches = relay.requests
        finally:
            relay.released.set()
            assert await service.stop() == 0
    report("certs endpoint hanging, five new tokens", {"sent_answered_s": [a[1:] for a in answers]})
    assert [code for code, _, _ in answers] == [grpc.StatusCode.UNAVAILABLE] * 5, answers
    assert fetches == 1, answers


async def test_stale_keys_verify_at_once_while_a_hanging_fetch_refreshes_them() -> None:
    with IdentityEmulator(certs_max_age_s=1) as emulator, CertsRelay(emulator.certs_url) as relay:
        service = await Service("routeguide", verifying(relay.url)).start()
        try:
            async with calls.insecure(service.address) as channel:
                assert await outcome(unary, channel, emulator.mint(ALICE, AUDIENCE)) == grpc.StatusCode.OK
                relay.hanging.set()
                await asyncio.sleep(1.3)  # past max-age: the keys are stale
                # A deadline shorter than the fetch's 5 s timeout: met only if nothing waits for the fetch.
                codes = []
                for index in range(4):
                    token = emulator.mint(ALICE, AUDIENCE, sub=f"stale-{index}")
                    try:
                        await calls.routeguide(channel).GetFeature(HERE, metadata=bearer(token), timeout=2)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as err:
                        codes.append(err.code())
                fetches = relay.requests
        finally:
            relay.released.set()
            assert await service.stop() == 0
    assert codes == [grpc.StatusCode.OK] * 4, codes
    assert fetches == 2  # the first, then one background refresh for all four calls


async def test_keys_stale_past_the_bound_are_not_used() -> None:
    with IdentityEmulator(certs_max_age_s=1) as emulator, CertsRelay(emulator.certs_url) as relay:
        verifier = TokenVerifier(AUDIENCE, relay.url, certs_timeout_s=0.5, certs_max_stale_s=1.0)
        assert (await verifier.verify(emulator.mint(ALICE, AUDIENCE))).email == ALICE
        relay.hanging.set()
        await asyncio.sleep(1.3)  # stale, within the bound: still verifying
        assert (await verifier.verify(emulator.mint(ALICE, AUDIENCE, sub="within"))).subject == "within"
        await asyncio.sleep(1.0)  # 2.3 s after the fetch: past max-age (1 s) + bound (1 s)
        with pytest.raises(AuthError) as info:
            await verifier.verify(emulator.mint(ALICE, AUDIENCE, sub="past"))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
