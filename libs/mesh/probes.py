"""The services that probes and tooling call rather than clients: gRPC health checking and reflection.

Two rules are drawn from this one list: such calls get no span and no metrics (mesh.server_spans,
mesh.client, mesh.metrics), and, with ID-token verification on, the one method Cloud Run's probes call
takes no token (mesh.identity.EXEMPT_METHODS, a narrower set: Watch and reflection still want one).
"""

HEALTH = "grpc.health.v1.Health"
# Prefixes of full service names ("grpc.reflection." covers both reflection versions).
PROBE_SERVICES = (HEALTH, "grpc.reflection.")
