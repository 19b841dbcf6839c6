"""The services that probes and tooling call rather than clients (gRPC health checking and reflection), and
the one reading of a gRPC method name.

Two rules are drawn from this one list: such calls get no span and no metrics (`probe`, asked by mesh.metrics
and both sides' spans), and, with ID-token verification on, the one method Cloud Run's probes call takes no
token (mesh.server's EXEMPT_METHODS, a narrower set: Watch and reflection still want one).
"""

from __future__ import annotations

HEALTH = "grpc.health.v1.Health"
# Prefixes of full service names ("grpc.reflection." covers both reflection versions).
PROBE_SERVICES = (HEALTH, "grpc.reflection.")


def method_names(method: str | bytes) -> tuple[str, str]:
    """(service, method) of gRPC's full method name: "/package.Service/Method" (grpc.aio's client hands it
    over as bytes) -> ("package.Service", "Method")."""
    name = method.decode() if isinstance(method, bytes) else method
    service, _, short = name[1:].partition("/")
    return service, short


def probe(service: str, services: tuple[str, ...] = PROBE_SERVICES) -> bool:
    """Whether `service` (a full service name) is one of `services` (by prefix): a probe's, by default."""
    return service.startswith(services)
