"""The local mesh as it runs on Cloud Run: who runs, who may call whom, and each service's environment.

Every service has its own service account (own metadata server in the identity emulator), its own audience,
an allow-list of its callers, TLS on every hop, and OTLP export of its spans to the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulators.identity import Names

PROJECT = "local-mesh"
NAMES = Names(PROJECT, "mesh.local")
DEVELOPER = NAMES.account("developer")
account = NAMES.account
audience = NAMES.audience


@dataclass(frozen=True)
class Spec:
    name: str
    module: str
    callers: tuple[str, ...]  # services allowed to call it, besides the developer
    # Upstream variable -> service it names: the variable gets localhost:PORT, VAR_AUDIENCE its audience.
    upstreams: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()


SERVICES: tuple[Spec, ...] = (
    Spec("ping-upstream", "services.ping.main", callers=("ping",)),
    Spec("routeguide", "services.routeguide.main", callers=("aggregator",)),
    Spec(
        "ping",
        "services.ping.main",
        callers=("aggregator",),
        upstreams=(("GRPC_PING_HOST", "ping-upstream"),),
    ),
    Spec(
        "aggregator",
        "services.aggregator.main",
        callers=(),
        upstreams=(("PING_ADDR", "ping"), ("ROUTEGUIDE_ADDR", "routeguide")),
    ),
)
BY_NAME = {spec.name: spec for spec in SERVICES}


def with_dependencies(names: list[str]) -> list[Spec]:
    """`names` and everything they call, in start order (upstreams first)."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for _, upstream in BY_NAME[name].upstreams:
                add(upstream)

    for name in names:
        add(name)
    return [spec for spec in SERVICES if spec.name in wanted]
