"""The CLI's one channel, made by the shared library from the global flags (never by hand)."""

from __future__ import annotations

import argparse
import os

from mesh import Channels, ConnectTo, Env, IdTokens, Upstream, audience_for

# Read-only calls, safe to retry on UNAVAILABLE (the shared channel's retry policy).
IDEMPOTENT = [
    "ping.PingService/Send",
    "routeguide.RouteGuide/GetFeature",
    "routeguide.RouteGuide/ListFeatures",
]


def upstream(args: argparse.Namespace, env: Env = os.environ) -> Upstream:
    """TLS with an ID token for https://HOST by default, as every call in the mesh.

    With --server-host the service is named by that host (e.g. a Cloud Run URL reached through another
    address), so the default audience follows it; --audience overrides both. MESH_CONNECT_TO (as in the
    services) dials a `run.app` name at the local front end: `--server ping-123.europe-west1.run.app:443`.
    ConfigError if it is wrong.
    """
    audience = args.audience
    if audience is None and args.server_host:
        audience = audience_for(args.server_host)
    return Upstream(
        address=args.server,
        insecure=args.insecure,
        unauthenticated=args.unauthenticated,
        audience=audience,
        ca_file=args.ca,
        authority=args.server_host,
    ).connected(ConnectTo.from_env(env))


def channels_for(target: Upstream) -> Channels:
    # gRPC sends no call credentials over plaintext, so a token is minted only for TLS calls that want one.
    needs_token = not (target.insecure or target.unauthenticated)
    return Channels(IdTokens() if needs_token else None)
