"""A service's last metrics reach the collector on SIGTERM, although its export interval is far away: the
points of the calls served just before (and during) the drain are not lost with the instance."""

from __future__ import annotations

import grpc

from localmesh.calls import CallStore, Series, add_receiver
from mesh.testing import NO_REUSEPORT
from ping import ping_pb2, ping_pb2_grpc
from tests.reliability.processes import Service


async def test_sigterm_flushes_the_call_metrics() -> None:
    store = CallStore()
    collector = grpc.aio.server(options=NO_REUSEPORT)
    add_receiver(store, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "600000",  # ten minutes: only the flush at shutdown can deliver them
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    try:
        service = await Service("ping", env).start()
        try:
            async with grpc.aio.insecure_channel(service.address, options=NO_REUSEPORT) as channel:
                stub = ping_pb2_grpc.PingServiceStub(channel)
                for _ in range(7):
                    await stub.Send(ping_pb2.Request(message="m"), timeout=10)
            assert store.calls() == {}  # nothing exported yet
        finally:
            assert await service.stop() == 0
        calls = store.calls()
    finally:
        await collector.stop(None)
    assert calls[Series("ping", "/ping.PingService/Send", "OK")].count == 7
    assert all(series.method.startswith("/ping.") for series in calls)  # health checks recorded nothing
