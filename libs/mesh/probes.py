"""The services that probes and tooling call rather than clients: gRPC health checking and reflection.

Two rules are drawn from this one list: such calls get no span and no metrics (`rpc_attributes`, for both
sides' spans and mesh.metrics), and, with ID-token verification on, the one method Cloud Run's probes call
takes no token (mesh.server's EXEMPT_METHODS, a narrower set: Watch and reflection still want one).
"""

from __future__ import annotations

HEALTH = "grpc.health.v1.Health"
# Prefixes of full service names ("grpc.reflection." covers both reflection versions).
PROBE_SERVICES = (HEALTH, "grpc.reflection.")


def rpc_attributes(method: str | bytes, untracked: tuple[str, ...] = PROBE_SERVICES) -> dict[str, str] | None:
    """How spans and metrics name a call (`rpc.system`, `rpc.service`, `rpc.method`) from its full method
    name, `/pkg.Service/Method` (bytes as grpc.aio's client hands it over); None for the `untracked` services.
    """
    name = method.decode() if isinstance(method, bytes) else method
    service, _, short = name.lstrip("/").partition("/")
    if service.startswith(untracked):
        return None
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short}
