"""What a caller is told when a downstream refuses the service it called: a real mesh (TLS, ID tokens, allow-lists)
in which ping-upstream, routeguide and ping do not allow their callers. The caller gets each downstream's status
code and name; the downstream's details ("caller not allowed: <account>") stay in the calling service's log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from aggregator.v1 import aggregator_pb2
from emulators.dev_ca import DevCerts
from emulators.identity import IdentityEmulator
from ping import ping_pb2
from routeguide.route_guide_pb2 import Point, Rectangle
from tests.reliability import calls
from tests.reliability.processes import Service
from tests.reliability.stack import DEVELOPER, account, audience, secure_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

HERE = Point(latitude=409146138, longitude=-746188906)
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(emulator: IdentityEmulator, certs: DevCerts) -> AsyncIterator[dict[str, Service]]:
    # Each downstream allows the developer only: the services calling them are refused.
    started = {}
    for name, kind in (("ping-upstream", "ping"), ("routeguide", None)):
        started[name] = await Service(name, secure_env(name, emulator, certs), kind=kind).start()
    relay = {
        "GRPC_PING_HOST": f"localhost:{started['ping-upstream'].port}",
        "GRPC_PING_HOST_AUDIENCE": audience("ping-upstream"),
    }
    started["ping"] = await Service("ping", {**secure_env("ping", emulator, certs), **relay}).start()
    upstreams = {
        "PING_ADDR": f"localhost:{started['ping'].port}",
        "PING_ADDR_AUDIENCE": audience("ping"),
        "ROUTEGUIDE_ADDR": f"localhost:{started['routeguide'].port}",
        "ROUTEGUIDE_ADDR_AUDIENCE": audience("routeguide"),
    }
    started["aggregator"] = await Service(
        "aggregator", {**secure_env("aggregator", emulator, certs), **upstreams}
    ).start()
    yield started
    for service in reversed(list(started.values())):
        assert await service.stop() == 0


async def test_a_relayed_ping_says_who_refused_and_how_not_why(
    mesh: dict[str, Service], emulator: IdentityEmulator, certs: DevCerts
) -> None:
    relay = mesh["ping"]
    async with calls.tls(relay.port, certs, emulator.mint(DEVELOPER, audience("ping"))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await calls.ping(channel).SendUpstream(ping_pb2.Request(message="m"), timeout=10)
    upstream = f"localhost:{mesh['ping-upstream'].port}"
    assert (info.value.code(), info.value.details()) == (DENIED, f"upstream {upstream}: PERMISSION_DENIED")
    # The detail is in the relay's own log, for its operators.
    assert any(f"caller not allowed: {account('ping')}" in m for m in relay.messages() if upstream in m)


async def test_a_survey_reports_each_downstream_code_without_its_details(
    mesh: dict[str, Service], emulator: IdentityEmulator, certs: DevCerts
) -> None:
    aggregator = mesh["aggregator"]
    request = aggregator_pb2.SurveyRequest(message="s", area=Rectangle(lo=HERE, hi=HERE), route=[HERE])
    async with calls.tls(aggregator.port, certs, emulator.mint(DEVELOPER, audience("aggregator"))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await calls.aggregator(channel).Survey(request, timeout=10)
    assert info.value.code() == DENIED
    assert info.value.details() == (
        "every downstream call failed: /ping.PingService/Send: PERMISSION_DENIED; "
        "/routeguide.RouteGuide/ListFeatures: PERMISSION_DENIED; /routeguide.RouteGuide/RecordRoute: PERMISSION_DENIED"
    )
    assert sum("caller not allowed" in m for m in aggregator.messages()) >= 3


async def test_a_tour_ends_with_the_downstream_code_and_name_only(
    mesh: dict[str, Service], emulator: IdentityEmulator, certs: DevCerts
) -> None:
    async def stops() -> AsyncIterator[aggregator_pb2.TourStop]:
        yield aggregator_pb2.TourStop(location=HERE, note="n")

    aggregator = mesh["aggregator"]
    updates = []
    async with calls.tls(aggregator.port, certs, emulator.mint(DEVELOPER, audience("aggregator"))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for update in calls.aggregator(channel).Tour(stops(), timeout=10):
                updates.append(update)
    assert (info.value.code(), info.value.details()) == (DENIED, "routeguide: PERMISSION_DENIED")
    # The stop's failed lookup, reported on its Arrival, is told the same way.
    failures = [u.arrival.failure for u in updates if u.HasField("arrival") and u.arrival.HasField("failure")]
    assert all(f.code == DENIED.value[0] and f.message == "PERMISSION_DENIED" for f in failures), failures
    logged = [m for m in aggregator.messages() if m.startswith("downstream call to routeguide failed")]
    assert any(f"caller not allowed: {account('aggregator')}" in m for m in logged), logged
