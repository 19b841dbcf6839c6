"""The canary's smoke test: one new revision, reached through its own URL (a Cloud Run tag), must report
grpc.health SERVING for its service and answer one real call with an ID token as its callers send it.

    smoke.check(Target(kind="ping", url="https://sha-0a1b2c3---ping-xyz.a.run.app", token=..., relay=True))

What each kind of service is asked (canonical answers, so a revision started on the wrong data fails):
ping: Send echoes the message (SendUpstream when it relays: its upstream answers through it); routeguide:
GetFeature at gRPC's first canonical place names it; aggregator: Survey of an area answers with the ping,
the canonical features in it and every downstream call OK. The token is sent, never printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.v1 import aggregator_pb2, aggregator_pb2_grpc
from ping import ping_pb2, ping_pb2_grpc
from routeguide import route_guide_pb2, route_guide_pb2_grpc

CALL_TIMEOUT_S = 10.0
# Each kind's grpc.health service name (the startup probe's) -> kind.
KINDS = {
    "ping.PingService": "ping",
    "routeguide.RouteGuide": "routeguide",
    "aggregator.v1.Aggregator": "aggregator",
}
# gRPC's canonical RouteGuide data: the first place, and an area holding some of its 100 features.
FIRST_PLACE = route_guide_pb2.Point(latitude=409146138, longitude=-746188906)
FIRST_PLACE_NAME = "Berkshire Valley Management Area Trail, Jefferson, NJ, USA"
AREA = route_guide_pb2.Rectangle(
    lo=route_guide_pb2.Point(latitude=400000000, longitude=-750000000),
    hi=route_guide_pb2.Point(latitude=420000000, longitude=-730000000),
)
# Channel options: no port sharing (tests bind port 0 in parallel).
OPTIONS: tuple[tuple[str, int | str], ...] = (("grpc.so_reuseport", 0),)


class SmokeFailed(Exception):
    """One line: the check that failed and what was seen."""


@dataclass(frozen=True)
class Target:
    kind: str  # ping, routeguide or aggregator
    url: str  # https://host[:port]
    token: str  # an ID token for the service's audience, from one of its callers
    relay: bool = False  # ping with an upstream: check SendUpstream too
    ca_file: Path | None = None  # extra root CA (the local stand-in's development CA)
    # MESH_CONNECT_TO's `SUFFIX=HOST:PORT` (the local Cloud Run): a URL whose host ends with SUFFIX is dialled
    # at HOST:PORT under its own name (TLS name and :authority), as the mesh's channels do.
    connect_to: str | None = None


def check(target: Target) -> None:
    """Raises SmokeFailed naming the check; returns when the revision passes."""
    parts = urlsplit(target.url)
    if parts.scheme != "https" or not parts.hostname:
        raise SmokeFailed(f"{target.url!r} is not an https URL")
    address, options = f"{parts.hostname}:{parts.port or 443}", list(OPTIONS)
    if target.connect_to:
        suffix, _, dialled = target.connect_to.partition("=")
        suffix = suffix.removeprefix(".")
        if not (suffix and dialled):
            raise SmokeFailed(f"MESH_CONNECT_TO {target.connect_to!r} is not SUFFIX=HOST:PORT")
        # Label by label, as mesh.settings matches it: `.run.app` is not the end of `evilrun.app`.
        if parts.hostname == suffix or parts.hostname.endswith(f".{suffix}"):
            name = (
                ("grpc.ssl_target_name_override", parts.hostname),
                ("grpc.default_authority", parts.hostname),
            )
            address, options = dialled, [*OPTIONS, *name]
    roots = target.ca_file.read_bytes() if target.ca_file else None
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(roots), grpc.access_token_call_credentials(target.token)
    )
    with grpc.secure_channel(address, credentials, options=options) as channel:
        service = next(name for name, kind in KINDS.items() if kind == target.kind)
        _health(channel, service)
        {"ping": _ping, "routeguide": _routeguide, "aggregator": _aggregator}[target.kind](channel, target)


def _call(what: str, rpc, request):  # type: ignore[no-untyped-def]
    try:
        return rpc(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        raise SmokeFailed(f"{what}: {error.code().name}: {error.details()}") from None


def _health(channel: grpc.Channel, service: str) -> None:
    reply = _call(
        "grpc.health",
        health_pb2_grpc.HealthStub(channel).Check,
        health_pb2.HealthCheckRequest(service=service),
    )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SmokeFailed(
            f"grpc.health: {service} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )


def _ping(channel: grpc.Channel, target: Target) -> None:
    stub = ping_pb2_grpc.PingServiceStub(channel)
    # The relay's upstream echoes what the relay sends it: the message, marked relayed.
    rpc, name, echo = (
        (stub.SendUpstream, "SendUpstream", "canary (relayed)")
        if target.relay
        else (stub.Send, "Send", "canary")
    )
    reply = _call(f"ping.{name}", rpc, ping_pb2.Request(message="canary"))
    if reply.pong.message != echo:
        raise SmokeFailed(f"ping.{name}: answered {reply.pong.message!r} to 'canary'")


def _routeguide(channel: grpc.Channel, target: Target) -> None:
    feature = _call(
        "routeguide.GetFeature", route_guide_pb2_grpc.RouteGuideStub(channel).GetFeature, FIRST_PLACE
    )
    if feature.name != FIRST_PLACE_NAME:
        raise SmokeFailed(f"routeguide.GetFeature: the first canonical place is named {feature.name!r}")


def _aggregator(channel: grpc.Channel, target: Target) -> None:
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    reply = _call("aggregator.Survey", stub.Survey, aggregator_pb2.SurveyRequest(message="canary", area=AREA))
    failed = [f"{c.method} code {c.code}: {c.message}" for c in reply.calls if c.code]
    if failed:
        raise SmokeFailed(f"aggregator.Survey: downstream calls failed: {'; '.join(failed)}")
    if reply.pong.message != "canary" or not reply.features:
        raise SmokeFailed(f"aggregator.Survey: pong {reply.pong.message!r}, {len(reply.features)} features")
