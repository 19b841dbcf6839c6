"""Each service image, run as Cloud Run runs it: non-root, locked down, only PORT (and its upstreams) set; it
answers health and a real RPC."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.daemon import Engine
from tests.images.conftest import SERVICES
from tests.images.containers import Container, ServiceImage, run, wait_serving
from tests.images.rpcs import CANONICAL_NAME, CANONICAL_POINT, get_feature, ping_send, survey, upstreams

NO_CAPABILITIES = "0000000000000000"


@pytest.fixture
def started(engine: Engine) -> Iterator[list[Container]]:
    """The containers a test started, removed afterwards whatever happened (their logs shown on failure)."""
    containers: list[Container] = []
    yield containers
    for container in containers:
        print(f"--- {container.name}\n{container.logs()}")
        container.remove()


@pytest.mark.parametrize("service", ["ping", "routeguide"])
async def test_serves_as_non_root_without_capabilities(
    service: str, engine: Engine, images: dict[str, ServiceImage], started: list[Container]
) -> None:
    container = run(engine, images[service])
    started.append(container)
    await wait_serving(container)

    status = dict(line.split(":", 1) for line in container.exec("cat", "/proc/1/status").splitlines())
    assert status["Uid"].split() == ["10001"] * 4 and status["Gid"].split() == ["10001"] * 4
    assert status["CapEff"].strip() == NO_CAPABILITIES and status["CapBnd"].strip() == NO_CAPABILITIES
    assert status["NoNewPrivs"].strip() == "1"
    assert container.inspect(
        "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}"
    ) == (f"true {512 * 1024 * 1024} {10**9}")
    # Only /tmp is writable (a tmpfs), as on Cloud Run's read-only root.
    assert (
        container.exec("sh", "-c", "touch /tmp/w && echo ok; touch /app/w 2>&1 || true").splitlines()[0]
        == "ok"
    )


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_health_reports_serving_for_the_service(
    service: str, engine: Engine, images: dict[str, ServiceImage], started: list[Container]
) -> None:
    if service == "aggregator":
        ping, routeguide = run(engine, images["ping"]), run(engine, images["routeguide"])
        started += [ping, routeguide]
        container = run(engine, images[service], upstreams(ping, routeguide))
    else:
        container = run(engine, images[service])
    started.append(container)
    await wait_serving(container)
    async with container.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICES[service]):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        unknown = health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        with pytest.raises(Exception, match="NOT_FOUND"):
            await unknown


async def test_ping_send_answers(
    engine: Engine, images: dict[str, ServiceImage], started: list[Container]
) -> None:
    container = run(engine, images["ping"])
    started.append(container)
    await wait_serving(container)
    async with container.channel() as channel:
        reply = await ping_send(channel, timeout=10)
    assert reply.pong.message == "from a container" and reply.pong.received_on.seconds > 0


async def test_routeguide_serves_the_canonical_feature(
    engine: Engine, images: dict[str, ServiceImage], started: list[Container]
) -> None:
    container = run(engine, images["routeguide"])
    started.append(container)
    await wait_serving(container)
    async with container.channel() as channel:
        feature = await get_feature(channel, timeout=10)
    assert feature.name == CANONICAL_NAME and feature.location == CANONICAL_POINT


async def test_aggregator_surveys_the_other_two_containers(
    engine: Engine, images: dict[str, ServiceImage], started: list[Container]
) -> None:
    ping, routeguide = run(engine, images["ping"]), run(engine, images["routeguide"])
    started += [ping, routeguide]
    aggregator = run(engine, images["aggregator"], upstreams(ping, routeguide))
    started.append(aggregator)
    for container in (ping, routeguide, aggregator):
        await wait_serving(container)
    async with aggregator.channel() as channel:
        reply = await survey(channel, timeout=20)
    assert reply.pong.message == "survey"
    assert CANONICAL_NAME in {f.name for f in reply.features}
    assert reply.route_summary.point_count == 2 and reply.route_summary.feature_count >= 1
    assert [(c.method, c.code) for c in reply.calls] == [
        ("/ping.PingService/Send", 0),
        ("/routeguide.RouteGuide/ListFeatures", 0),
        ("/routeguide.RouteGuide/RecordRoute", 0),
    ]
