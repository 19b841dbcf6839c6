"""`docker stop` is how Cloud Run ends an instance: SIGTERM, then SIGKILL 10 s later. The image must drain."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.daemon import Engine
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from tests.images.containers import ServiceImage, run, wait_serving
from tests.images.rpcs import CANONICAL_POINT

CLOUD_RUN_GRACE_S = 10
HealthStatus = health_pb2.HealthCheckResponse


async def test_sigterm_mid_stream_turns_not_serving_finishes_the_stream_and_exits_0(
    engine: Engine, images: dict[str, ServiceImage]
) -> None:
    container = run(engine, images["routeguide"])
    try:
        await wait_serving(container)

        def note(message: str) -> route_guide_pb2.RouteNote:
            return route_guide_pb2.RouteNote(location=CANONICAL_POINT, message=message)

        async with container.channel() as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="routeguide.RouteGuide")
            )
            assert (await asyncio.wait_for(watch.read(), 10)).status == HealthStatus.SERVING
            chat = route_guide_pb2_grpc.RouteGuideStub(channel).RouteChat(timeout=30)
            await chat.write(note("before"))
            await chat.write(note("during"))
            assert (await asyncio.wait_for(chat.read(), 10)).message == "before"  # the stream is live

            stopping = asyncio.create_task(container.stop(timeout=CLOUD_RUN_GRACE_S))
            assert (await asyncio.wait_for(watch.read(), 10)).status == HealthStatus.NOT_SERVING
            watch.cancel()  # a watch is a stream too: it would hold the drain open

            # In flight before SIGTERM, so it may go on: one more exchange, then a clean end.
            await chat.write(note("after"))
            replies = [(await asyncio.wait_for(chat.read(), 10)).message for _ in range(2)]
            assert replies == ["before", "during"]
            await chat.done_writing()
            assert await asyncio.wait_for(chat.read(), 10) == grpc.aio.EOF
            assert await chat.code() == grpc.StatusCode.OK

        seconds = await stopping
        assert container.inspect("{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false", container.logs()
        assert seconds < CLOUD_RUN_GRACE_S  # SIGKILL would have come at 10 s (and exit 137)
        logs = container.logs()
        assert "Traceback" not in logs, logs
    finally:
        container.remove()
