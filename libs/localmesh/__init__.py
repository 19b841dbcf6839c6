"""The local mesh: every service as its own process on loopback, wired as on Cloud Run."""

import os

# The launcher forks service processes while gRPC threads run; gRPC's fork handlers only add noise here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
