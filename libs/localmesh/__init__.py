"""The local mesh: the services' manifests deployed on the local Cloud Run (libs/cloudrun), with a demo."""

import os

# The launcher forks service processes while gRPC threads run; gRPC's fork handlers only add noise here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
